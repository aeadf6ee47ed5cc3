package speed

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"
)

// llama.cpp's layers follow ours: none on the CPU, all for 0 on a GPU.
func TestLlamaGPULayers(t *testing.T) {
	for _, c := range []struct {
		device string
		n      int
		want   int
	}{
		{"", 0, 0},
		{"cpu", 5, 0},
		{" CPU", 0, 0},
		{"gpu", 0, 999},
		{"CUDA0", 0, 999},
		{"gpu", 7, 7},
	} {
		t.Run(fmt.Sprintf("%q-%d", c.device, c.n), func(t *testing.T) {
			require.Equal(t, c.want, llamaGPULayers(c.device, c.n))
		})
	}
}
