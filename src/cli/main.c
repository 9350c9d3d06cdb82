/* loom: one binary, subcommands. Placeholder until the serve CLI lands. */
#include <stdio.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc < 2 || !strcmp(argv[1], "--help") || !strcmp(argv[1], "-h")) {
        printf("usage: loom <command> [options]\n");
        return 0;
    }
    fprintf(stderr, "loom: unknown command '%s'\n", argv[1]);
    return 2;
}
