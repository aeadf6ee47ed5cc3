package device_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/device"
	"github.com/kvrecall/kvrecall/internal/testmodels"
)

// childEnv marks the process that lists the devices with backend libraries
// on its path: the loader runs once per process, so a test of what it
// loads runs in a process of its own.
const childEnv = "KVRECALL_DEVICE_TEST_CHILD"

func TestMain(m *testing.M) {
	if os.Getenv(childEnv) != "" {
		// The child of listIn: print what the loader registered, run no test.
		b, err := json.Marshal(device.List())
		if err != nil {
			panic(err)
		}
		os.Stdout.WriteString("DEVICES " + string(b) + "\n")
		os.Exit(0)
	}
	testmodels.NoBackendLibraries()
	os.Exit(m.Run())
}

func TestBuiltinCPUAndResolve(t *testing.T) {
	devs := device.List()
	require.Len(t, devs, 1, "no backend library on the path: only the compiled-in CPU")
	cpu := devs[0]
	require.Equal(t, device.CPU, cpu.Kind)
	require.False(t, cpu.Loaded)
	require.Equal(t, "CPU", cpu.Name)
	require.NotEmpty(t, cpu.Description)

	for _, c := range []struct {
		name, want, err string
	}{
		{"", "CPU", ""},
		{"cpu", "CPU", ""},
		{" CPU ", "CPU", ""},
		{"gpu", "", "no GPU device is loaded"},
		{"CUDA0", "", `device "CUDA0": no such device (devices: CPU;`},
	} {
		t.Run(c.name, func(t *testing.T) {
			d, err := device.Resolve(devs, c.name)
			if c.err != "" {
				require.ErrorContains(t, err, c.err)
				if c.name == "gpu" {
					require.ErrorContains(t, err, "make cuda", "the error says how to get one")
				}
				return
			}
			require.NoError(t, err)
			require.Equal(t, c.want, d.Name)
			require.Equal(t, cpu, d)
		})
	}
	_, err := device.Default(nil)
	require.Error(t, err)
}

// TestLoadedCPUVariants checks ollama's loader the way a GPU library is
// loaded, with the CPU variants `make cpu-backends` builds (x64 and
// haswell): it must register the best variant the CPU runs ahead of the
// compiled-in CPU backend, so that models run on it.
func TestLoadedCPUVariants(t *testing.T) {
	lib := testmodels.CPUBackends(t)
	devs := listIn(t, lib)
	require.GreaterOrEqual(t, len(devs), 2, "%+v", devs)
	first := devs[0]
	require.Equal(t, device.CPU, first.Kind)
	require.True(t, first.Loaded, "a loaded variant scores above the compiled-in CPU backend: %+v", devs)
	builtin := 0
	for _, d := range devs[1:] {
		require.False(t, d.Loaded, "one variant is loaded, the best: %+v", devs)
		if d.Kind == device.CPU {
			builtin++
		}
	}
	require.Equal(t, 1, builtin, "the compiled-in CPU backend stays registered")
	def, err := device.Default(devs)
	require.NoError(t, err)
	require.Equal(t, first, def, "models run on the loaded variant")

	// The loader picks by score: haswell where the CPU has what it needs.
	flags := cpuFlags(t)
	haswell := flags["avx2"] && flags["fma"] && flags["bmi2"] && flags["f16c"]
	hasAVX2 := false
	for _, f := range first.Features {
		hasAVX2 = hasAVX2 || f == "AVX2"
	}
	require.Equal(t, haswell, hasAVX2, "loaded variant's features %v", first.Features)
	// Neither variant has AVX-512 code: features reported by the library,
	// not by the compiled-in backend (-march=native) answering for it.
	require.NotContains(t, first.Features, "AVX512")
}

// listIn runs this test binary with the loader pointed at lib and returns
// what List gave there.
func listIn(t *testing.T, lib string) []device.Info {
	exe, err := os.Executable()
	require.NoError(t, err)
	cmd := exec.Command(exe)
	cmd.Env = append(os.Environ(), childEnv+"=1", "OLLAMA_LIBRARY_PATH="+lib)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	require.NoError(t, cmd.Run(), "child: %s\n%s", out.String(), errb.String())
	for _, line := range strings.Split(out.String(), "\n") {
		if rest, ok := strings.CutPrefix(line, "DEVICES "); ok {
			var devs []device.Info
			require.NoError(t, json.Unmarshal([]byte(rest), &devs))
			return devs
		}
	}
	t.Fatalf("child printed no devices: %s\n%s", out.String(), errb.String())
	return nil
}

func cpuFlags(t *testing.T) map[string]bool {
	b, err := os.ReadFile("/proc/cpuinfo")
	require.NoError(t, err)
	out := map[string]bool{}
	for _, line := range strings.Split(string(b), "\n") {
		if rest, ok := strings.CutPrefix(line, "flags"); ok {
			_, list, _ := strings.Cut(rest, ":")
			for _, f := range strings.Fields(list) {
				out[f] = true
			}
			break
		}
	}
	require.NotEmpty(t, out)
	return out
}
