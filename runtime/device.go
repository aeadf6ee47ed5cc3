package runtime

import (
	"fmt"

	"github.com/ollama/ollama/ml"

	"github.com/kvrecall/kvrecall/device"
)

// DeviceUse says where a model's layers run.
type DeviceUse struct {
	// Device is the device of the offloaded layers, or the CPU device when
	// none is offloaded.
	Device device.Info `json:"device"`
	// CPU is the CPU device that runs everything not offloaded (ggml's
	// first CPU device: a loaded CPU variant if there is one).
	CPU device.Info `json:"cpu"`
	// GPULayers of Layers+1 (the repeating layers and the output layer)
	// are on Device; 0 when Device is the CPU.
	GPULayers int `json:"gpu_layers"`
	Layers    int `json:"layers"`
}

// Device reports where the model's layers run.
func (m *Model) Device() DeviceUse { return m.device }

// placeLayers resolves the device a user asked for and lists the layers to
// offload to it in ollama's form (layer index blocks is the output layer).
func placeLayers(name string, gpuLayers, blocks int) (DeviceUse, ml.GPULayersList, error) {
	devs := device.List()
	cpu, err := device.Default(devs)
	if err != nil {
		return DeviceUse{}, nil, err
	}
	d, err := device.Resolve(devs, name)
	if err != nil {
		return DeviceUse{}, nil, err
	}
	use := DeviceUse{Device: d, CPU: cpu, Layers: blocks}
	if !d.IsGPU() {
		if d.Kind != device.CPU {
			return DeviceUse{}, nil, fmt.Errorf("device %s is a %s device: layers go to the CPU or a GPU", d.Name, d.Kind)
		}
		if d.Index != cpu.Index {
			// ollama's backend runs every layer kept on the host on ggml's
			// first CPU device; another one cannot be chosen.
			return DeviceUse{}, nil, fmt.Errorf("device %s: layers kept on the host run on %s", d, cpu)
		}
		return use, nil, nil
	}
	if gpuLayers < 0 {
		return DeviceUse{}, nil, fmt.Errorf("GPU layers %d is negative (0 offloads every layer)", gpuLayers)
	}
	layers := offloadedLayers(gpuLayers, blocks)
	use.GPULayers = len(layers)
	return use, ml.GPULayersList{{DeviceID: ml.DeviceID{ID: d.ID, Library: d.Library}, Layers: layers}}, nil
}

// checkOffload makes sure that ollama's backend put the offloaded layers'
// weights on the device: it keeps a layer on the CPU, without a word, when
// the device's ID does not match, and a GPU run would then compare the CPU
// with itself.
func checkOffload(mem ml.BackendMemory, d device.Info, layers ml.GPULayersList) error {
	if len(layers) == 0 {
		return nil
	}
	for _, g := range mem.GPUs {
		if g.DeviceID != layers[0].DeviceID {
			continue
		}
		for _, l := range layers[0].Layers {
			if l >= len(g.Weights) || g.Weights[l] == 0 {
				return fmt.Errorf("device %s: layer %d of the offloaded ones has no weights there (the backend kept it on the CPU)", d, l)
			}
		}
		return nil
	}
	return fmt.Errorf("device %s: the backend placed nothing on it (no GPU with id %q, library %q)", d, layers[0].ID, layers[0].Library)
}

// offloadedLayers lists the layers n GPU layers are, as llama.cpp's -ngl n
// places them: the last n repeating layers, and the output layer (index
// blocks) once n exceeds them. n = 0 means all of them.
func offloadedLayers(n, blocks int) []int {
	if n <= 0 || n > blocks+1 {
		n = blocks + 1
	}
	layers := make([]int, 0, n)
	for l := max(0, blocks-n); l < blocks; l++ {
		layers = append(layers, l)
	}
	if n > blocks {
		layers = append(layers, blocks)
	}
	return layers
}
