/*
 * cli: the `loom` binary. main.c dispatches to one function per subcommand (one file each);
 * this header lists them and a few argument helpers they share. Only this directory exits.
 *
 * Exit codes: 0 success, 1 runtime failure (for example a port in use), 2 bad usage or input
 * that cannot be used (flags, model files).
 */
#ifndef LOOM_CLI_H
#define LOOM_CLI_H

#include <stdbool.h>
#include <stdint.h>

#define CLI_EXIT_OK 0
#define CLI_EXIT_FAIL 1
#define CLI_EXIT_USAGE 2

/* A subcommand: argv[0] is its name. Returns the process exit code. */
typedef int (*cli_command_fn)(int argc, char **argv);

int cli_serve(int argc, char **argv);
int cli_moe(int argc, char **argv);
int cli_plan(int argc, char **argv);
int cli_bench(int argc, char **argv);
int cli_train(int argc, char **argv);
int cli_profile(int argc, char **argv);
int cli_gateway(int argc, char **argv);
int cli_up(int argc, char **argv);

/* Integer in [lo, hi], whole string. */
bool cli_parse_int(const char *s, long long lo, long long hi, long long *out);
/* A byte count: "1048576", "512MiB", "2GiB", "1.5GB", "64k" (k/M/G/T powers of 1000 with B,
 * of 1024 with iB or bare). */
bool cli_parse_bytes(const char *s, uint64_t *out);
/* "loom CMD: <message>" and "Run 'loom CMD --help' for the options." on stderr; returns
 * CLI_EXIT_USAGE. */
int cli_usage_error(const char *cmd, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* true when name is a dispatch policy; else says which are, on stderr, as "loom CMD: ...". */
bool cli_policy_known(const char *cmd, const char *name);
/* "1.5 GiB" style, for messages. */
void cli_format_bytes(uint64_t n, char *out, int cap);

#endif
