package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall"
	"github.com/kvrecall/kvrecall/gguf"
	"github.com/kvrecall/kvrecall/haystack"
	"github.com/kvrecall/kvrecall/internal/cli"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	// Which backends load must not depend on the caller's environment.
	testmodels.NoBackendLibraries()
	os.Unsetenv("KVRECALL_DEVICE")
	os.Unsetenv("KVRECALL_GPU_LAYERS")
	os.Exit(m.Run())
}

// devices lists the compiled-in CPU (no backend library on the path), as a
// table and as JSON; a device that is not there fails the model's open.
func TestDevices(t *testing.T) {
	out, errOut, err := kv(t, "", "devices")
	require.NoError(t, err)
	require.Contains(t, out, "NAME")
	require.Regexp(t, `(?m)^CPU +cpu +CPU +built in +host `, out)
	require.Contains(t, errOut, "backend libraries searched in: no folder (OLLAMA_LIBRARY_PATH is empty)")

	out, _, err = kv(t, "", "devices", "--json")
	require.NoError(t, err)
	var got struct {
		Devices []struct {
			Name, Kind string
			Loaded     bool
		}
		LibraryPaths []string `json:"library_paths"`
	}
	require.NoError(t, json.Unmarshal([]byte(out), &got))
	require.Len(t, got.Devices, 1)
	require.Equal(t, "CPU", got.Devices[0].Name)
	require.Equal(t, "cpu", got.Devices[0].Kind)
	require.False(t, got.Devices[0].Loaded)
	require.Empty(t, got.LibraryPaths, "TestMain loads no backend library")

	_, _, err = kv(t, "", "devices", "extra")
	require.ErrorContains(t, err, "devices takes no arguments")

	model := testmodels.Recall(t)
	_, _, err = kv(t, "", "docs", "ls", "--model", model, "--data", t.TempDir(), "--device", "gpu")
	require.ErrorContains(t, err, "no GPU device is loaded")
	require.ErrorContains(t, err, "make cuda")
}

// kv runs the command in-process and returns its stdout and stderr.
func kv(t *testing.T, stdin string, args ...string) (string, string, error) {
	t.Helper()
	var out, errOut bytes.Buffer
	err := run(context.Background(), args, strings.NewReader(stdin), &out, &errOut)
	return out.String(), errOut.String(), err
}

// The top-level help lists every command; each command's help says what
// it does and lists its flags; help requests succeed.
func TestHelp(t *testing.T) {
	for _, args := range [][]string{{"--help"}, {"-h"}, {"help"}} {
		out, _, err := kv(t, "", args...)
		require.NoError(t, err)
		for name := range commands() {
			require.Contains(t, out, "\n  "+name+" ", "the help lists %s", name)
		}
	}
	cases := []struct {
		args []string
		want []string
	}{
		{[]string{"help", "ingest"}, []string{"usage: kvrecall ingest FILE", "-id", "-model", "-data", "-ctx"}},
		{[]string{"ingest", "-h"}, []string{"usage: kvrecall ingest FILE"}},
		{[]string{"ask", "--help"}, []string{"usage: kvrecall ask --doc ID", "-method", "-budget", "-max-tokens", "-raw"}},
		{[]string{"help", "docs"}, []string{"usage: kvrecall docs ls | rm ID..."}},
		{[]string{"help", "run"}, []string{"usage: kvrecall run [flags] [PROMPT...]", "/reset", "-system", "-doc", "-i"}},
	}
	for _, c := range cases {
		t.Run(strings.Join(c.args, " "), func(t *testing.T) {
			out, _, err := kv(t, "", c.args...)
			require.True(t, err == nil || errors.Is(err, flag.ErrHelp), "%v", err)
			require.Equal(t, 0, cli.ExitCode("kvrecall", err))
			for _, w := range c.want {
				require.Contains(t, out, w)
			}
		})
	}
}

// Bad invocations are usage errors (exit status 2) that say what is wrong.
func TestUsageErrors(t *testing.T) {
	cases := []struct {
		args []string
		want string
	}{
		{nil, "missing command"},
		{[]string{"frobnicate"}, `unknown command "frobnicate"`},
		{[]string{"ingest"}, "ingest takes one FILE"},
		{[]string{"ingest", "a", "b"}, "got 2 arguments"},
		{[]string{"ask", "what?"}, "--doc ID is required"},
		{[]string{"docs"}, "docs needs ls or rm"},
		{[]string{"docs", "mv"}, `unknown docs command "mv"`},
		{[]string{"docs", "rm"}, "at least one ID"},
		{[]string{"run", "--max-tokens", "x"}, `invalid value "x"`},
		{[]string{"run", "-i", "hello"}, "drop the prompt"},
		{[]string{"run", "-i", "--raw"}, "--raw continues one prompt"},
		{[]string{"run", "--format", "yaml", "hello"}, `invalid value "yaml" for flag -format: want "json", a JSON Schema object or @FILE`},
	}
	for _, c := range cases {
		t.Run(c.want, func(t *testing.T) {
			_, _, err := kv(t, "", c.args...)
			require.ErrorContains(t, err, c.want)
			var ue *cli.UsageError
			require.ErrorAs(t, err, &ue)
			require.Equal(t, 2, cli.ExitCode("kvrecall", err))
		})
	}
}

// ingest, docs ls, ask and docs rm on the recall model in a temporary data
// directory: the answer is the needle's, and a removed document is gone.
func TestDocumentsRoundTrip(t *testing.T) {
	model := testmodels.Recall(t)
	dir := t.TempDir()
	f, err := gguf.Open(model)
	require.NoError(t, err)
	voc, err := haystack.LoadVocab(f)
	require.NoError(t, err)
	c, err := voc.NewCase(1024, []float64{0.4}, 5)
	require.NoError(t, err)
	m, err := kvrecall.Open(context.Background(), model, kvrecall.Options{Threads: 1, ContextLength: 2048, DataDir: t.TempDir()})
	require.NoError(t, err)
	words := func(ids []int32) string {
		s, err := m.Detokenize(ids)
		require.NoError(t, err)
		return strings.TrimPrefix(s, " ")
	}
	text, question, answer := words(c.Tokens[1:]), words(voc.Question(c.Needles[0])), words(c.Needles[0].Values)
	m.Close()
	file := filepath.Join(dir, "hay.txt")
	require.NoError(t, os.WriteFile(file, []byte(text), 0o644))
	common := []string{"--model", model, "--data", filepath.Join(dir, "docs"), "--ctx", "2048", "--threads", "2"}

	out, _, err := kv(t, "", append([]string{"ingest", file}, common...)...) // the id defaults to the file's name
	require.NoError(t, err)
	require.Contains(t, out, "hay: 1024 tokens")
	out, _, err = kv(t, "", append(append([]string{"ingest"}, common...), file, "--id", "hay")...)
	require.NoError(t, err)
	require.Contains(t, out, "hay: already ingested")
	out, _, err = kv(t, text, append([]string{"ingest", "-", "--id", "stdin-copy"}, common...)...)
	require.NoError(t, err)
	require.Contains(t, out, "stdin-copy: 1024 tokens")

	out, _, err = kv(t, "", append([]string{"docs", "ls"}, common...)...)
	require.NoError(t, err)
	lines := strings.Split(strings.TrimSpace(out), "\n")
	require.Len(t, lines, 3, out)
	require.Regexp(t, `^ID\s+TOKENS\s+PAGES`, lines[0])
	require.Regexp(t, `^hay\s+1024\s+16\s`, lines[1])
	require.Regexp(t, `^stdin-copy\s+1024\s+16\s`, lines[2])

	for _, method := range []string{"retro", "dense"} {
		t.Run("ask "+method, func(t *testing.T) {
			out, errOut, err := kv(t, "", append([]string{"ask", "--doc", "hay", "--method", method, "--budget", "512", "--max-tokens", "3", "--stats", question}, common...)...)
			require.NoError(t, err)
			require.Equal(t, " "+answer+"\n", out)
			require.Contains(t, errOut, "(1024 reused)")
		})
	}
	out, _, err = kv(t, question, append([]string{"ask", "--doc", "stdin-copy", "--max-tokens", "3"}, common...)...)
	require.NoError(t, err)
	require.Equal(t, " "+answer+"\n", out, "the question from stdin")

	out, _, err = kv(t, "", append([]string{"docs", "rm", "hay", "stdin-copy"}, common...)...)
	require.NoError(t, err)
	require.Equal(t, "removed hay\nremoved stdin-copy\n", out)
	out, errOut, err := kv(t, "", append([]string{"docs", "ls"}, common...)...)
	require.NoError(t, err)
	require.Empty(t, out)
	require.Contains(t, errOut, "no documents")
	_, _, err = kv(t, "", append([]string{"ask", "--doc", "hay", question}, common...)...)
	require.ErrorIs(t, err, kvrecall.ErrNoDocument)
	_, _, err = kv(t, "", append([]string{"docs", "rm", "hay"}, common...)...)
	require.ErrorIs(t, err, kvrecall.ErrNoDocument)
}

// run answers a prompt from its arguments or stdin, streaming, and chats
// turn by turn with -i, each turn seeing the conversation so far.
func TestRun(t *testing.T) {
	model := testmodels.StoriesV3(t)
	common := []string{"--model", model, "--ctx", "512", "--threads", "2", "--data", t.TempDir()}
	const story = ", there was a little girl named Lily"
	out, _, err := kv(t, "", append([]string{"run", "--max-tokens", "11", "--stop", "."}, append(common, "Once", "upon", "a", "time")...)...)
	require.NoError(t, err)
	require.Equal(t, story+"\n", out)
	out, _, err = kv(t, "Once upon a time\n", append([]string{"run", "--max-tokens", "11", "--stop", "."}, common...)...)
	require.NoError(t, err)
	require.Equal(t, story+"\n", out, "the prompt from stdin")
	out, _, err = kv(t, "Once upon a time\n", append([]string{"run", "--raw", "--max-tokens", "11", "--stop", "."}, common...)...)
	require.NoError(t, err)
	require.Equal(t, story+"\n", out, "without a template, chat and raw prompts are the same")

	out, _, err = kv(t, "Once upon a time\n\n/reset\nOnce upon a time\n/bye\nnever read\n", append([]string{"run", "-i", "--max-tokens", "11", "--stop", "."}, common...)...)
	require.NoError(t, err)
	require.Equal(t, ">>> "+story+"\n>>> >>> (conversation cleared)\n>>> "+story+"\n>>> ", out)
	// The second turn sees the first: its prompt is longer than the first's.
	_, errOut, err := kv(t, "Once upon a time\nOnce upon a time\n", append([]string{"run", "-i", "--stats", "--max-tokens", "11", "--stop", "."}, common...)...)
	require.NoError(t, err)
	require.Contains(t, errOut, "[5 prompt tokens")
	require.Regexp(t, `\[(1[6-9]|[2-9]\d) prompt tokens`, errOut, "the second turn's prompt holds the first turn")

	// --format constrains the answer: a schema inline or from a file.
	schema := `{"type":"object","properties":{"name":{"type":"string","maxLength":12}},"required":["name"],"additionalProperties":false}`
	file := filepath.Join(t.TempDir(), "schema.json")
	require.NoError(t, os.WriteFile(file, []byte(schema), 0o644))
	for _, f := range []string{schema, "@" + file} {
		out, _, err = kv(t, "", append([]string{"run", "--max-tokens", "100", "--format", f}, append(common, "Once", "upon", "a", "time")...)...)
		require.NoError(t, err)
		var v struct{ Name string }
		require.NoError(t, json.Unmarshal([]byte(out), &v), "%q", out)
		require.NotEmpty(t, v.Name)
	}
	_, _, err = kv(t, "", append([]string{"run", "--format", `{"type":"int"}`}, append(common, "Once")...)...)
	require.ErrorIs(t, err, kvrecall.ErrFormat)
	require.ErrorContains(t, err, "unknown type int")
}
