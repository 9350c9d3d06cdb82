/*
 * loom: one binary, subcommands. Each subcommand lives in its own file and is listed in the
 * table below; `loom <command> --help` documents its flags.
 */
#include "cli.h"

#include "loom/blas_cpu.h"

#include <stdio.h>
#include <string.h>

typedef struct cli_command {
    const char *name;
    const char *summary;
    cli_command_fn run;
} cli_command;

static const cli_command commands[] = {
    {"serve", "one inference instance: a Hugging Face model behind an OpenAI-compatible HTTP API",
     cli_serve},
    {"plan", "deployment planning: cluster + model + workload -> plan.yaml (instances, TP, KV "
             "blocks, predicted capacity)",
     cli_plan},
    {"up", "start a plan's instances and a gateway in front of them: one OpenAI endpoint",
     cli_up},
    {"gateway", "OpenAI-compatible front door: a dispatch policy picks the instance per request",
     cli_gateway},
    {"bench", "replay a trace or synthetic load against OpenAI endpoints: TTFT, TPOT, "
              "throughput, goodput",
     cli_bench},
    {"train", "train a (MoE) language model, expert parallel over MPI; export a HF checkpoint",
     cli_train},
    {"profile", "time a small grid of batches on an instance and fit the latency model; --host "
                "measures this host",
     cli_profile},
    {"moe", "routing analysis and capacity bounds for MoE routers", cli_moe},
};

static void usage(FILE *f)
{
    fprintf(f, "usage: loom <command> [options]\n\ncommands:\n");
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        fprintf(f, "  %-10s %s\n", commands[i].name, commands[i].summary);
    fprintf(f, "\nRun 'loom <command> --help' for the options of a command.\n");
}

int main(int argc, char **argv)
{
    tensor_blas_check_cpu(argv);
    if (argc < 2) {
        usage(stderr);
        return CLI_EXIT_USAGE;
    }
    if (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h") || !strcmp(argv[1], "help")) {
        usage(stdout);
        return CLI_EXIT_OK;
    }
    for (size_t i = 0; i < sizeof(commands) / sizeof(commands[0]); i++)
        if (!strcmp(argv[1], commands[i].name))
            return commands[i].run(argc - 1, argv + 1);
    fprintf(stderr, "loom: unknown command '%s'\n", argv[1]);
    usage(stderr);
    return CLI_EXIT_USAGE;
}
