/*
 * Bearer-token check shared by `loom serve` and `loom gateway`: one implementation of the
 * constant-time comparison, so a fix to it reaches both front doors.
 */
#include "loom/server.h"

#include <event2/http.h>
#include <event2/keyvalq_struct.h>
#include <string.h>
#include <strings.h>

/* Constant-time comparison of the presented key with ours: the time does not depend on where
 * the first differing byte is. */
static bool key_matches(const char *given, const char *want)
{
    size_t a = strlen(given), b = strlen(want);
    unsigned diff = (unsigned)(a ^ b);
    for (size_t i = 0; i < b; i++)
        diff |= (unsigned)(unsigned char)want[i] ^ (unsigned)(unsigned char)(i < a ? given[i] : 0);
    return diff == 0;
}

bool http_bearer_authorized(struct evhttp_request *evreq, const char *api_key)
{
    if (!api_key)
        return true;
    const char *h = evhttp_find_header(evhttp_request_get_input_headers(evreq), "Authorization");
    if (!h || strncasecmp(h, "Bearer ", 7) != 0)
        return false;
    h += 7;
    while (*h == ' ')
        h++;
    return key_matches(h, api_key);
}
