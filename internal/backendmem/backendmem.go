// Package backendmem serializes the creation of long-lived tensors in
// ollama's ggml backend.
//
// A tensor made in a context bound to a layer (ml.Context.Layer) adds its
// size to the backend's per-layer memory accounting
// (ml/backend/ggml Context.newTensor: btDeviceMemory[buft].Cache[layer] +=
// size) without a lock. ollama's runner creates such tensors from one
// goroutine; kvrecall's sessions create their pools, quest's box tensors,
// squeezed's centroid tensors and DenseCache's per-layer KV concurrently
// (two questions at once), which the race detector reports. Every creation
// of a tensor in a layer-bound context goes through Do.
package backendmem

import "sync"

var mu sync.Mutex

// Do runs f, which creates tensors in layer-bound contexts, under the one
// lock every such creation shares. f must not call Do.
func Do(f func()) {
	mu.Lock()
	defer mu.Unlock()
	f()
}
