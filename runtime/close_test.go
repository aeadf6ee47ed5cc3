package runtime_test

import (
	"context"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/runtime"
)

// Closing a model while a generation runs (a shutdown whose grace period
// ran out) must wait for the forward pass in flight and refuse the next one,
// never free the backend under it (that was a SIGSEGV in cgo).
func TestCloseDuringGeneration(t *testing.T) {
	prompt := strings.Repeat("The cat sat on the mat. ", 10)
	cases := []struct {
		name string
		// hook installs the callback that closes the model mid-generation.
		hook func(o *runtime.GenerateOptions, closeNow func())
	}{
		{"during prefill", func(o *runtime.GenerateOptions, closeNow func()) {
			o.OnPrefill = func(done, total int) {
				if done == 8 {
					closeNow()
				}
			}
		}},
		{"during decode", func(o *runtime.GenerateOptions, closeNow func()) {
			n := 0
			o.OnToken = func(runtime.Token) error {
				if n++; n == 3 {
					closeNow()
				}
				return nil
			}
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			m := openStories(t, runtime.Options{BatchSize: 4})
			closed := make(chan struct{})
			opts := runtime.GenerateOptions{MaxTokens: 400}
			c.hook(&opts, func() {
				go func() { m.Close(); close(closed) }()
			})
			_, err := m.Generate(context.Background(), prompt, opts)
			require.ErrorIs(t, err, runtime.ErrClosed, "the generation is refused its next forward pass")
			<-closed
			_, err = m.NewSession()
			require.ErrorIs(t, err, runtime.ErrClosed)
			_, err = m.Generate(context.Background(), "Once", runtime.GenerateOptions{MaxTokens: 2})
			require.ErrorIs(t, err, runtime.ErrClosed)
			m.Close() // twice is harmless
		})
	}
}
