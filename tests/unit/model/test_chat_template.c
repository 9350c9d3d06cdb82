/* Chat templates: the fixture's ChatML template, hand-written Llama-3, Mistral [INST] and
 * Qwen2 style templates with renders derived by hand, the Jinja features real templates use,
 * and clean errors for everything else. */
#include "testlib.h"

#include "loom/tokenizer.h"

static const chat_message CONV[] = {
    {"system", "You are a bot."},
    {"user", " Hi! "},
    {"assistant", "Hello."},
    {"user", "Bye"},
};

static char *render(const char *tmpl, const chat_message *m, int n, bool gen, const char *bos,
                    const char *eos)
{
    char *out = NULL;
    loom_err e = {0};
    int rc = chat_template_render(tmpl, m, n, gen, bos, eos, &out, &e);
    if (rc)
        print_error("render failed: %s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    return out;
}

static void expect(const char *tmpl, const char *want)
{
    char *out = render(tmpl, CONV, 4, true, "<s>", "</s>");
    if (strcmp(out, want) != 0)
        print_error("template: %s\n got: [%s]\nwant: [%s]\n", tmpl, out, want);
    assert_string_equal(out, want);
    free(out);
}

/* Renders with CONV and expects failure code with needle in the message. */
static void expect_error(const char *tmpl, int code, const char *needle)
{
    char *out = NULL;
    loom_err e = {0};
    int rc = chat_template_render(tmpl, CONV, 4, true, "<s>", "</s>", &out, &e);
    if (rc != code || !strstr(e.msg, needle))
        print_error("template: %s\n rc %d msg '%s' (want %d, '%s')\n", tmpl, rc, e.msg, code,
                    needle);
    assert_int_equal(rc, code);
    assert_non_null(strstr(e.msg, needle));
    assert_null(out);
}

/* ---------------------------------------------------------------- real template styles */

static void test_fixture_chatml(void **state)
{
    (void)state;
    const char *shared = test_shared_dir();
    if (!shared) {
        skip();
        return;
    }
    char *path = test_path(shared, "fixtures/tokenizer/chat_template.jinja");
    char *tmpl = NULL;
    loom_err e = {0};
    assert_int_equal(loom_read_file(path, &tmpl, NULL, &e), LOOM_OK);
    free(path);
    chat_message m[] = {{"system", "You are terse."}, {"user", "Speak, friend."}};
    char *out = render(tmpl, m, 2, true, NULL, NULL);
    assert_string_equal(out, "<|im_start|>system\nYou are terse.<|im_end|>\n"
                             "<|im_start|>user\nSpeak, friend.<|im_end|>\n"
                             "<|im_start|>assistant\n");
    free(out);
    /* without the generation prompt the trailing newline after {% endif %} is trimmed */
    out = render(tmpl, m, 1, false, NULL, NULL);
    assert_string_equal(out, "<|im_start|>system\nYou are terse.<|im_end|>\n");
    free(out);
    free(tmpl);
}

/* Meta Llama-3 Instruct's template. */
static const char LLAMA3[] =
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ "
    "message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}";

static void test_llama3(void **state)
{
    (void)state;
    /* `| trim` binds to message['content'] only; bos only before the first message */
    char *out = render(LLAMA3, CONV, 2, true, "<|begin_of_text|>", "<|eot_id|>");
    assert_string_equal(out, "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n"
                             "You are a bot.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
                             "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n");
    free(out);
    out = render(LLAMA3, CONV + 1, 2, false, "<|begin_of_text|>", "<|eot_id|>");
    assert_string_equal(out, "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\n"
                             "Hi!<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
                             "Hello.<|eot_id|>");
    free(out);
}

/* Mistral Instruct's template: multi-line, whitespace-controlled, with raise_exception. */
static const char MISTRAL[] =
    "{%- if messages[0]['role'] == 'system' %}\n"
    "    {%- set system_message = messages[0]['content'] %}\n"
    "    {%- set loop_messages = messages[1:] %}\n"
    "{%- else %}\n"
    "    {%- set loop_messages = messages %}\n"
    "{%- endif %}\n"
    "\n"
    "{{- bos_token }}\n"
    "{%- for message in loop_messages %}\n"
    "    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}\n"
    "        {{- raise_exception('After the optional system message, conversation roles must "
    "alternate user/assistant/user/assistant/...') }}\n"
    "    {%- endif %}\n"
    "    {%- if message['role'] == 'user' %}\n"
    "        {%- if loop.first and system_message is defined %}\n"
    "            {{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}\n"
    "        {%- else %}\n"
    "            {{- ' [INST] ' + message['content'] + ' [/INST]' }}\n"
    "        {%- endif %}\n"
    "    {%- elif message['role'] == 'assistant' %}\n"
    "        {{- ' ' + message['content'] + eos_token}}\n"
    "    {%- else %}\n"
    "        {{- raise_exception('Only user and assistant roles are supported!') }}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n";

static void test_mistral(void **state)
{
    (void)state;
    /* system message folded into the first [INST]; every newline and indent stripped */
    char *out = render(MISTRAL, CONV, 4, true, "<s>", "</s>");
    assert_string_equal(out, "<s> [INST] You are a bot.\n\n Hi!  [/INST] Hello.</s> [INST] Bye "
                             "[/INST]");
    free(out);
    out = render(MISTRAL, CONV + 1, 1, true, "<s>", "</s>");
    assert_string_equal(out, "<s> [INST]  Hi!  [/INST]");
    free(out);
    /* roles that do not alternate: the template's own message, as LOOM_EINVAL */
    chat_message bad[] = {{"user", "a"}, {"user", "b"}};
    char *o = NULL;
    loom_err e = {0};
    assert_int_equal(chat_template_render(MISTRAL, bad, 2, true, "<s>", "</s>", &o, &e),
                     LOOM_EINVAL);
    assert_string_equal(e.msg, "After the optional system message, conversation roles must "
                               "alternate user/assistant/user/assistant/...");
    assert_null(o);
}

/* Qwen2.5's template (tools branch included; reached through chat_template_render_json). */
static const char QWEN2[] =
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a "
    "helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' "
    "}}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n";

static void test_qwen2(void **state)
{
    (void)state;
    /* no system message: the default one; `tools` undefined is falsy */
    char *out = render(QWEN2, CONV + 1, 1, true, NULL, "<|im_end|>");
    assert_string_equal(out, "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are "
                             "a helpful assistant.<|im_end|>\n<|im_start|>user\n Hi! <|im_end|>\n"
                             "<|im_start|>assistant\n");
    free(out);
    out = render(QWEN2, CONV, 3, false, NULL, "<|im_end|>");
    assert_string_equal(out, "<|im_start|>system\nYou are a bot.<|im_end|>\n"
                             "<|im_start|>user\n Hi! <|im_end|>\n"
                             "<|im_start|>assistant\nHello.<|im_end|>\n");
    free(out);

    /* tools, a tool call with dict arguments (tojson, key order kept, non-ASCII raw), two
     * consecutive tool results merged into one user turn */
    const char *vars =
        "{\"messages\":[{\"role\":\"user\",\"content\":\"Weather?\"},"
        "{\"role\":\"assistant\",\"content\":null,\"tool_calls\":[{\"type\":\"function\","
        "\"function\":{\"name\":\"get\",\"arguments\":{\"city\":\"Z\\u00fcrich\",\"days\":2}}}]},"
        "{\"role\":\"tool\",\"content\":\"21C\"},{\"role\":\"tool\",\"content\":\"sunny\"}],"
        "\"tools\":[{\"name\":\"get\",\"parameters\":{\"type\":\"object\",\"required\":[\"city\"]"
        "}}],\"add_generation_prompt\":true}";
    loom_err e = {0};
    int rc = chat_template_render_json(QWEN2, vars, &out, &e);
    if (rc)
        print_error("%s\n", e.msg);
    assert_int_equal(rc, LOOM_OK);
    assert_string_equal(out,
                        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                        "helpful assistant.\n\n# Tools\n\n<tools>\n"
                        "{\"name\": \"get\", \"parameters\": {\"type\": \"object\", "
                        "\"required\": [\"city\"]}}\n</tools><|im_end|>\n"
                        "<|im_start|>user\nWeather?<|im_end|>\n"
                        "<|im_start|>assistant\n<tool_call>\n{\"name\": \"get\", \"arguments\": "
                        "{\"city\": \"Z\xC3\xBCrich\", \"days\": 2}}\n</tool_call><|im_end|>\n"
                        "<|im_start|>user\n<tool_response>\n21C\n</tool_response>\n"
                        "<tool_response>\nsunny\n</tool_response><|im_end|>\n"
                        "<|im_start|>assistant\n");
    free(out);
    assert_int_equal(chat_template_render_json(QWEN2, "[1]", &out, &e), LOOM_EINVAL);
}

/* ---------------------------------------------------------------- language features */

static void test_whitespace_control(void **state)
{
    (void)state;
    /* trim_blocks + lstrip_blocks, as transformers configures Jinja */
    expect("  {% if true %}\n  X\n  {% endif %}\nY", "  X\nY");
    expect("a {%- if true -%} b {%- endif -%} c", "abc");
    expect("a\n  {%+ if true %}b{% endif %}", "a\n  b");
    expect("{{ 'x' }}\n{{ 'y' }}\n", "x\ny"); /* one trailing newline dropped */
    expect("a {# note #}\nb\n  {# indented #}\nc", "a b\nc");
    expect("{%- for m in messages -%}\n  [{{ m.role[0] }}]\n{%- endfor %}\n", "[s][u][a][u]");
    expect("line\r\n{% if true %}\r\nx\r\n{% endif %}", "line\nx\n"); /* \r\n normalised */
    expect("{% raw %}{{ not evaluated }}{% endraw %}", "{{ not evaluated }}");
}

static void test_loops_and_scope(void **state)
{
    (void)state;
    expect("{% for m in messages %}{{ loop.index }}/{{ loop.length }}"
           "{% if loop.first %}F{% endif %}{% if loop.last %}L{% endif %} {% endfor %}",
           "1/4F 2/4 3/4 4/4L ");
    expect("{% for m in messages %}{{ loop.index0 }}{{ loop.revindex }}{% endfor %}", "04132231");
    /* set inside a loop does not leak; namespace() carries state out */
    expect("{% set x = 'top' %}{% for m in messages %}{% set x = m.role %}{% endfor %}{{ x }}",
           "top");
    expect("{% set ns = namespace(r='') %}{% for m in messages %}{% set ns.r = ns.r ~ m.role[0] "
           "%}{% endfor %}{{ ns.r }}",
           "suau");
    /* set inside if (no new scope) is visible after it */
    expect("{% if true %}{% set y = 'v' %}{% endif %}{{ y }}", "v");
    /* loop filter, else, break/continue, tuple unpacking */
    expect("{% for m in messages if m.role == 'user' %}{{ loop.index }}{{ m.content | trim }}"
           "{% endfor %}",
           "1Hi!2Bye");
    expect("{% for i in [] %}x{% else %}empty{% endfor %}", "empty");
    expect("{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}"
           "{% if i > 3 %}{% break %}{% endif %}{{ i }}{% endfor %}",
           "013");
    expect("{% for k, v in {'a': 1, 'b': 2} | items %}{{ k }}={{ v }};{% endfor %}", "a=1;b=2;");
    expect("{% for m in messages[1:3] %}{{ m.role }},{% endfor %}", "user,assistant,");
    expect("{% for m in messages %}{% if not loop.first %}{{ loop.previtem.role[0] }}"
           "{% endif %}{% endfor %}",
           "sua");
}

static void test_expressions(void **state)
{
    (void)state;
    expect("{{ messages[0]['role'] }} {{ messages[-1].content }} {{ messages[0].nope is "
           "defined }}",
           "system Bye False");
    expect("{{ 1 < 2 and not (2 > 3) }} {{ 'b' in 'abc' }} {{ 'z' not in ['a'] }} "
           "{{ x is defined }} {{ none is none }} {{ 'a' is string }} {{ 3 != 3 }}",
           "True True True False True True False");
    expect("{{ 'a' + 'b' ~ 1 }} {{ 7 // 2 }} {{ -7 // 2 }} {{ 7 % 3 }} {{ 7 / 2 }} {{ 2 ** 8 }}",
           "ab1 3 -4 1 3.5 256");
    expect("{{ 'yes' if add_generation_prompt else 'no' }} {{ bos_token ~ eos_token }}",
           "yes <s></s>");
    expect("{% if messages[0].role == 'user' %}u{% elif messages[0].role == 'system' %}s"
           "{% else %}o{% endif %}",
           "s");
    expect("{{ 'a\\tb\\n' | tojson }} {{ '\\u00e9' }} {{ \"it's\" }}",
           "\"a\\tb\\n\" \xC3\xA9 it's");
    expect("{{ none }} {{ true }} {{ [1, 'a', none] }} {{ {'k': 1.5} }} {{ undefined_name }}|",
           "None True [1, 'a', None] {'k': 1.5} |");
    expect("{{ 'héllo'[1] }} {{ 'hello'[1:3] }} {{ 'abc'[::-1] }} {{ [1, 2, 3][-1] }}",
           "\xC3\xA9 el cba 3");
    expect("{{ ' x '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'Hi'.startswith('H') }}|"
           "{{ 'ab'.upper() }}|{{ {'k': 1}.get('z', 'd') }}",
           "x|['a', 'b']|True|AB|d");
}

static void test_filters(void **state)
{
    (void)state;
    expect("{{ '  x ' | trim }}|{{ messages | length }}|{{ 'ab' | upper }}|{{ 'AB' | lower }}|"
           "{{ 'héllo' | length }}",
           "x|4|AB|ab|5");
    expect("{{ {'a': [1, 'é', none, true]} | tojson }}|{{ {'b': 1, 'a': 2} | tojson(indent=2) }}",
           "{\"a\": [1, \"\xC3\xA9\", null, true]}|{\n  \"b\": 1,\n  \"a\": 2\n}");
    expect("{{ messages | map(attribute='role') | join(',') }}|"
           "{{ messages | selectattr('role', 'equalto', 'user') | list | length }}|"
           "{{ nothing | default('dflt') }}|{{ [3, 1, 2] | sort | first }}|{{ 'x' | string }}",
           "system,user,assistant,user|2|dflt|1|x");
    expect("{{ 'a-b' | replace('-', '+') }}|{{ [1, 2] | last }}|{{ 'hello world' | title }}|"
           "{{ 'cap' | capitalize }}|{{ -3 | abs }}|{{ '42' | int + 1 }}",
           "a+b|2|Hello World|Cap|3|43");
    expect("{% macro turn(m, tag='#') %}{{ tag }}{{ m.role }}{% endmacro %}"
           "{{ turn(messages[0]) }}{{ turn(messages[1], tag='>') }}",
           "#system>user");
    expect("{% set block %}<{{ messages | length }}>{% endset %}{{ block }}{{ block }}", "<4><4>");
}

/* ---------------------------------------------------------------- errors */

static void test_errors(void **state)
{
    (void)state;
    /* unsupported constructs name themselves and where they are */
    expect_error("{{ messages | wordwrap }}", LOOM_EUNSUPPORTED, "filter 'wordwrap'");
    expect_error("line1\n  {{ x | bogus }}", LOOM_EUNSUPPORTED, "(line 2, column 8)");
    expect_error("{% include 'other.jinja' %}", LOOM_EUNSUPPORTED, "statement 'include'");
    expect_error("{{ foo() }}", LOOM_EUNSUPPORTED, "function 'foo'");
    expect_error("{{ x is prime }}", LOOM_EUNSUPPORTED, "test 'prime'");
    expect_error("{{ messages.append(1) }}", LOOM_EUNSUPPORTED, "list.append()");
    expect_error("{{ '%s' % 1 }}", LOOM_EUNSUPPORTED, "'%'");
    /* syntax errors */
    expect_error("{% if true %}never closed", LOOM_EFORMAT, "{% endif %}");
    expect_error("{% for m in messages %}{% endif %}", LOOM_EFORMAT, "unexpected 'endif'");
    expect_error("{{ 1 + }}", LOOM_EFORMAT, "expected an expression");
    expect_error("{{ 'abc }}", LOOM_EFORMAT, "unterminated string");
    expect_error("{{ x ", LOOM_EFORMAT, "unclosed '{{'");
    expect_error("{# never closed", LOOM_EFORMAT, "unclosed comment");
    expect_error("{% break %}", LOOM_EFORMAT, "outside a loop");
    expect_error("{{ a $ b }}", LOOM_EFORMAT, "unexpected character '$'");
    /* runtime errors */
    expect_error("{{ raise_exception('bad role: ' + messages[0].role) }}", LOOM_EINVAL,
                 "bad role: system");
    expect_error("{{ 1 + 'a' }}", LOOM_EINVAL, "unsupported operand types");
    expect_error("{{ 1 // 0 }}", LOOM_EINVAL, "by zero");
    expect_error("{% set x.y = 1 %}", LOOM_EINVAL, "not a namespace");
    char *out = NULL;
    loom_err e = {0};
    assert_int_equal(chat_template_render(NULL, CONV, 1, true, NULL, NULL, &out, &e), LOOM_EINVAL);
}

/* Work, depth and size are bounded: hostile templates fail cleanly and quickly. */
static void test_limits(void **state)
{
    (void)state;
    expect_error("{% for i in range(3000) %}{% for j in range(3000) %}{% endfor %}{% endfor %}",
                 LOOM_ETOOLONG, "steps");
    expect_error("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", LOOM_ETOOLONG, "deep");
    expect_error("{% set ns = namespace() %}{% set ns.x = ns %}{{ ns }}", LOOM_ETOOLONG, "deep");
    expect_error("{{ 'x' * 1000000000 }}", LOOM_EINVAL, "too long");
    expect_error("{% set ns = namespace(s='xxxxxxxxxxxxxxxx') %}{% for i in range(40) %}"
                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
                 LOOM_ETOOLONG, "MiB");
    expect_error("{{ range(100000000) | length }}", LOOM_EINVAL, "range()");
    /* nesting far deeper than any template: an error, never a stack overflow */
    size_t depth = 100000;
    char *deep = malloc(2 * depth + 16);
    char *p = deep;
    p += sprintf(p, "{{ ");
    for (size_t i = 0; i < depth; i++)
        *p++ = '(';
    *p++ = '1';
    for (size_t i = 0; i < depth; i++)
        *p++ = ')';
    strcpy(p, " }}");
    expect_error(deep, LOOM_ETOOLONG, "deep");
    p = deep;
    for (size_t i = 0; i < depth / 20; i++)
        p += sprintf(p, "{%% if 1 %%}");
    *p = 0;
    expect_error(deep, LOOM_ETOOLONG, "deep");
    free(deep);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_fixture_chatml),
        cmocka_unit_test(test_llama3),
        cmocka_unit_test(test_mistral),
        cmocka_unit_test(test_qwen2),
        cmocka_unit_test(test_whitespace_control),
        cmocka_unit_test(test_loops_and_scope),
        cmocka_unit_test(test_expressions),
        cmocka_unit_test(test_filters),
        cmocka_unit_test(test_errors),
        cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
