package cli

import (
	"flag"
	"fmt"
	"io"
	"testing"

	"github.com/stretchr/testify/require"
)

func TestParseInterleaved(t *testing.T) {
	cases := []struct {
		args []string
		id   string
		pos  []string
	}{
		{[]string{"FILE", "--id", "x"}, "x", []string{"FILE"}},
		{[]string{"--id", "x", "FILE"}, "x", []string{"FILE"}},
		{[]string{"a", "--id", "x", "b"}, "x", []string{"a", "b"}},
		{[]string{"--id", "x", "--", "-not-a-flag", "--id"}, "x", []string{"-not-a-flag", "--id"}},
		{nil, "", nil},
	}
	for _, c := range cases {
		t.Run(fmt.Sprint(c.args), func(t *testing.T) {
			fs := flag.NewFlagSet("t", flag.ContinueOnError)
			fs.SetOutput(io.Discard)
			id := fs.String("id", "", "")
			pos, err := ParseInterleaved(fs, c.args)
			require.NoError(t, err)
			require.Equal(t, c.id, *id)
			require.Equal(t, c.pos, pos)
		})
	}
	fs := flag.NewFlagSet("t", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	_, err := ParseInterleaved(fs, []string{"a", "--nope"})
	require.ErrorContains(t, err, "nope")
}

// Only the named flags read the environment; without names, every flag does.
func TestFromEnvNames(t *testing.T) {
	t.Setenv("KVRECALL_MODEL", "m.gguf")
	t.Setenv("KVRECALL_RAW", "true")
	for _, c := range []struct {
		name  string
		names []string
		raw   bool
	}{
		{"named", []string{"model"}, false},
		{"all", nil, true},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := flag.NewFlagSet("x", flag.ContinueOnError)
			model := fs.String("model", "", "")
			raw := fs.Bool("raw", false, "")
			require.NoError(t, FromEnv(fs, c.names...))
			require.Equal(t, "m.gguf", *model)
			require.Equal(t, c.raw, *raw)
		})
	}
}
