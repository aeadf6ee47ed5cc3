package runtime_test

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/ollama/ollama/ml"
	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/device"
	"github.com/kvrecall/kvrecall/foundry"
	"github.com/kvrecall/kvrecall/internal/testmodels"
	"github.com/kvrecall/kvrecall/runtime"
)

func TestOffloadedLayers(t *testing.T) {
	for _, c := range []struct {
		n, blocks int
		want      []int
	}{
		{0, 4, []int{0, 1, 2, 3, 4}}, // 0: every layer and the output (index 4)
		{1, 4, []int{3}},             // llama.cpp -ngl 1: the last repeating layer
		{3, 4, []int{1, 2, 3}},
		{4, 4, []int{0, 1, 2, 3}},    // all repeating layers, output on the CPU
		{5, 4, []int{0, 1, 2, 3, 4}}, // and the output
		{99, 4, []int{0, 1, 2, 3, 4}},
		{2, 16, []int{14, 15}},
	} {
		t.Run(fmt.Sprintf("%d-of-%d", c.n, c.blocks), func(t *testing.T) {
			require.Equal(t, c.want, runtime.OffloadedLayers(c.n, c.blocks))
		})
	}
}

// A GPU run must fail when ollama's backend kept an offloaded layer on the
// CPU (it does so without a word when the device's ID does not match).
func TestCheckOffload(t *testing.T) {
	gpu := device.Info{Name: "CUDA0", Kind: device.GPU, ID: "GPU-1", Library: "CUDA"}
	id := ml.DeviceID{ID: "GPU-1", Library: "CUDA"}
	want := ml.GPULayersList{{DeviceID: id, Layers: []int{2, 3, 4}}}
	for _, c := range []struct {
		name string
		mem  ml.BackendMemory
		err  string
	}{
		{"on the GPU", ml.BackendMemory{GPUs: []ml.DeviceMemory{{DeviceID: id, Weights: []uint64{0, 0, 5, 5, 1}}}}, ""},
		{"one layer kept on the CPU", ml.BackendMemory{GPUs: []ml.DeviceMemory{{DeviceID: id, Weights: []uint64{0, 0, 5, 0, 1}}}}, "layer 3"},
		{"no such GPU", ml.BackendMemory{GPUs: []ml.DeviceMemory{{DeviceID: ml.DeviceID{ID: "GPU-2", Library: "CUDA"}, Weights: []uint64{5, 5, 5, 5, 5}}}}, "placed nothing on it"},
	} {
		t.Run(c.name, func(t *testing.T) {
			err := runtime.CheckOffload(c.mem, gpu, want)
			if c.err == "" {
				require.NoError(t, err)
				return
			}
			require.ErrorContains(t, err, c.err)
		})
	}
	require.NoError(t, runtime.CheckOffload(ml.BackendMemory{}, device.Info{Kind: device.CPU}, nil), "nothing offloaded")
}

func TestOpenDevice(t *testing.T) {
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 1, false)
	ctx := context.Background()
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 256, DataDir: t.TempDir()})
	require.NoError(t, err)
	use := m.Device()
	m.Close()
	require.Equal(t, device.CPU, use.Device.Kind)
	require.Equal(t, use.CPU, use.Device)
	require.Zero(t, use.GPULayers)
	require.Equal(t, m.Config().Layers, use.Layers)

	for _, c := range []struct{ device, err string }{
		{"gpu", "no GPU device is loaded"},
		{"CUDA0", `device "CUDA0": no such device`},
	} {
		t.Run(c.device, func(t *testing.T) {
			_, err := runtime.Open(ctx, path, runtime.Options{Threads: 1, ContextLength: 256, DataDir: t.TempDir(), Device: c.device})
			var oe *runtime.OpenError
			require.True(t, errors.As(err, &oe), "%v", err)
			require.ErrorContains(t, err, c.err)
		})
	}
}

// loadedChildEnv marks the child of TestLoadedCPUBackend: the backend
// loader runs once per process, so the model runs on a loaded CPU variant
// in a process of its own (runtime's TestMain hands over to deviceChild).
const loadedChildEnv = "KVRECALL_LOADED_BACKEND_CHILD"

// deviceRun is what a process computed: the device, a dense prompt's
// logits and a paged document session's (quest under a budget smaller
// than the document, through the in-place attention ops).
type deviceRun struct {
	Device runtime.DeviceUse
	Dense  [][]float32
	Paged  [][]float32
}

func deviceWork(ctx context.Context, path, data string) (*deviceRun, error) {
	m, err := runtime.Open(ctx, path, runtime.Options{Threads: 2, ContextLength: 1024, DataDir: data})
	if err != nil {
		return nil, err
	}
	defer m.Close()
	toks := make([]int32, 600)
	for i := range toks {
		toks[i] = int32(3 + (i*131)%500)
	}
	out := &deviceRun{Device: m.Device()}
	s, err := m.NewSession()
	if err != nil {
		return nil, err
	}
	defer s.Close()
	if out.Dense, err = s.Eval(ctx, toks[:64], true, nil); err != nil {
		return nil, err
	}
	doc, err := m.IngestTokens(ctx, "device", toks, nil)
	if err != nil {
		return nil, err
	}
	ps, err := m.DocumentSession(doc, runtime.PolicyOptions{Policy: "quest", Budget: 160, Sinks: 16, Window: 32})
	if err != nil {
		return nil, err
	}
	defer ps.Close()
	out.Paged, err = ps.Eval(ctx, []int32{7, 11, 13, 17, 19, 23, 29, 31}, true, nil)
	return out, err
}

// deviceChild is the child's whole run: it prints its deviceRun as JSON.
func deviceChild() {
	res, err := deviceWork(context.Background(), os.Getenv("KVRECALL_TEST_MODEL"), os.Getenv("KVRECALL_TEST_DATA"))
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		os.Exit(1)
	}
	b, err := json.Marshal(res)
	if err != nil {
		panic(err)
	}
	os.Stdout.WriteString("RESULT " + string(b) + "\n")
	os.Exit(0)
}

// TestLoadedCPUBackend runs a model on a CPU variant that ollama's loader
// brought in from build/test/lib/ollama (make cpu-backends), the path a CUDA
// library takes, and checks it against the compiled-in CPU backend: same
// logits (other SIMD code, so within rounding) for a dense prompt and for
// a paged document session whose custom attention ops run on the loaded
// backend's threads.
func TestLoadedCPUBackend(t *testing.T) {
	lib := testmodels.CPUBackends(t)
	path := testmodels.Random(t, "llama", "tiny", foundry.F32, 4, false)

	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), loadedChildEnv+"=1", "OLLAMA_LIBRARY_PATH="+lib,
		"KVRECALL_TEST_MODEL="+path, "KVRECALL_TEST_DATA="+t.TempDir())
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	require.NoError(t, cmd.Run(), "child: %s\n%s", stdout.String(), stderr.String())
	var loaded *deviceRun
	for _, line := range strings.Split(stdout.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "RESULT "); ok {
			loaded = new(deviceRun)
			require.NoError(t, json.Unmarshal([]byte(rest), loaded))
		}
	}
	require.NotNil(t, loaded, "child printed no result: %s\n%s", stdout.String(), stderr.String())

	builtin, err := deviceWork(context.Background(), path, t.TempDir())
	require.NoError(t, err)
	require.False(t, builtin.Device.CPU.Loaded)
	require.True(t, loaded.Device.CPU.Loaded, "the child ran on a loaded variant: %+v", loaded.Device)
	require.True(t, loaded.Device.Device.Loaded)
	t.Logf("loaded: %s %v", loaded.Device.CPU, loaded.Device.CPU.Features)

	for _, c := range []struct {
		name      string
		got, want [][]float32
	}{
		{"dense", loaded.Dense, builtin.Dense},
		{"paged quest", loaded.Paged, builtin.Paged},
	} {
		t.Run(c.name, func(t *testing.T) {
			require.Len(t, c.got, len(c.want))
			d, scale := maxDiff(c.got, c.want)
			t.Logf("max |diff| %.3g at logit scale %.3g", d, scale)
			require.Greater(t, scale, 1.0, "degenerate logits")
			require.LessOrEqual(t, d, 1e-3*scale)
		})
	}
}
