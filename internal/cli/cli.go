// Package cli holds what kvrecall's commands share: the process entry
// point (signals, exit status) and flags that may also come from the
// environment. Each subcommand's logic lives in a package below it with a
// Run function; cmd/kvrecall dispatches to them, and the older single
// commands (cmd/serve, cmd/mkmodel, cmd/heads, cmd/demo) are thin wrappers
// around the same.
package cli

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"slices"
	"strings"
)

// Main runs one command: ctx is cancelled on the first interrupt, -h is
// success, and an error is printed as "name: error" with exit status 1
// (2 for bad usage).
func Main(name string, run func(ctx context.Context, args []string) error) {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	err := run(ctx, os.Args[1:])
	stop()
	os.Exit(ExitCode(name, err))
}

// UsageError marks a bad invocation (exit status 2, as flag uses).
type UsageError struct{ Err error }

func (e *UsageError) Error() string { return e.Err.Error() }
func (e *UsageError) Unwrap() error { return e.Err }

// Usagef returns a UsageError.
func Usagef(format string, args ...any) error {
	return &UsageError{Err: fmt.Errorf(format, args...)}
}

// ExitCode prints err (unless it is a help request) and returns the exit status.
func ExitCode(name string, err error) int {
	var ue *UsageError
	switch {
	case err == nil, errors.Is(err, flag.ErrHelp):
		return 0
	case errors.As(err, &ue):
		fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
		return 2
	}
	fmt.Fprintf(os.Stderr, "%s: %v\n", name, err)
	return 1
}

// QuietLogs sends only errors of the default logger to stderr: ggml,
// llama.cpp and ollama's backend loader log every load at info level.
func QuietLogs() {
	slog.SetDefault(slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelError})))
}

// EnvName is the variable of a flag: --kv-budget -> KVRECALL_KV_BUDGET.
func EnvName(flagName string) string {
	return "KVRECALL_" + strings.ToUpper(strings.ReplaceAll(flagName, "-", "_"))
}

// FromEnv sets fs's flags from their KVRECALL_* variables (flags given on
// the command line override them). With names, only those flags read the
// environment: a variable meant for one flag (KVRECALL_MODEL) must not
// quietly set an unrelated one that happens to share a subcommand
// (KVRECALL_I, KVRECALL_RAW).
func FromEnv(fs *flag.FlagSet, names ...string) error {
	var err error
	fs.VisitAll(func(f *flag.Flag) {
		if len(names) > 0 && !slices.Contains(names, f.Name) {
			return
		}
		if v, ok := os.LookupEnv(EnvName(f.Name)); ok && err == nil {
			if e := f.Value.Set(v); e != nil {
				err = fmt.Errorf("%s=%q: %v", EnvName(f.Name), v, e)
			}
		}
	})
	return err
}

// ParseInterleaved parses args with flags before, between and after the
// positional arguments (`ingest FILE --id x`), which flag.Parse alone
// stops at, and returns the positional ones. "--" ends the flags.
func ParseInterleaved(fs *flag.FlagSet, args []string) ([]string, error) {
	var pos []string
	for {
		if err := fs.Parse(args); err != nil {
			return nil, err
		}
		rest := fs.Args()
		if len(rest) == 0 {
			return pos, nil
		}
		if len(args) > 0 && len(rest) < len(args) && args[len(args)-len(rest)-1] == "--" {
			return append(pos, rest...), nil
		}
		pos = append(pos, rest[0])
		args = rest[1:]
	}
}
