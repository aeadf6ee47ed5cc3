package speed

import (
	"fmt"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/device"
	"github.com/kvrecall/kvrecall/runtime"
)

// llama.cpp's layers follow ours: none and no device on the CPU; on a GPU
// that device, all layers for our 0, else the same count.
func TestLlamaPlacement(t *testing.T) {
	cpu := runtime.DeviceUse{Device: device.Info{Name: "CPU", Kind: device.CPU}}
	gpu := runtime.DeviceUse{Device: device.Info{Name: "CUDA1", Kind: device.GPU}}
	for _, c := range []struct {
		use      runtime.DeviceUse
		n        int
		wantName string
		want     int
	}{
		{cpu, 0, "", 0},
		{cpu, 5, "", 0},
		{gpu, 0, "CUDA1", 999},
		{gpu, 7, "CUDA1", 7},
	} {
		t.Run(fmt.Sprintf("%s-%d", c.use.Device.Name, c.n), func(t *testing.T) {
			require.Equal(t, c.wantName, llamaDeviceName(c.use))
			require.Equal(t, c.want, llamaGPULayers(c.use, c.n))
		})
	}
}
