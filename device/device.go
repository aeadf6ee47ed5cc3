// Package device lists the ggml devices a model can run on and resolves a
// user's device name to one of them.
//
// The CPU backend is compiled into every kvrecall binary (cgo). Other
// backends are shared libraries that ollama's loader registers when the
// process first opens a model: ggml-cuda built by `make cuda`, or CPU
// variants built by `make cpu-backends` (scripts/build-backends.sh). It looks
// in $OLLAMA_LIBRARY_PATH, else in ../lib/ollama next to the executable, and
// only in folders whose path contains lib/ollama. The same binary thus runs
// with or without a GPU (docs/gpu.md).
package device

/*
#include <stdlib.h>
#include "ggml-backend.h"
#include "ggml-cpu.h"

// The features a backend reports (CPU variants: "AVX2" = "1", ...), through
// the optional proc address ggml_backend_get_features.
static struct ggml_backend_feature * kvr_features(ggml_backend_reg_t reg) {
	void * fn = ggml_backend_reg_get_proc_address(reg, "ggml_backend_get_features");
	if (fn == NULL) {
		return NULL;
	}
	return ((ggml_backend_get_features_t) fn)(reg);
}
static struct ggml_backend_feature * kvr_feature_at(struct ggml_backend_feature * f, int i) { return &f[i]; }
*/
import "C"

import (
	"fmt"
	"sort"
	"strings"
	"sync"

	ggmlsrc "github.com/ollama/ollama/ml/backend/ggml/ggml/src"
)

// Kind is what sort of device ggml says a device is.
type Kind string

const (
	CPU   Kind = "cpu"
	GPU   Kind = "gpu"
	IGPU  Kind = "igpu"  // integrated GPU
	Accel Kind = "accel" // an accelerator that shares the CPU's memory (BLAS, AMX)
)

// Info describes one ggml device.
type Info struct {
	Index       int    `json:"index"`       // position in ggml's device list (highest loader score first)
	Name        string `json:"name"`        // ggml's name: "CPU", "CUDA0"
	Description string `json:"description"` // the hardware: "NVIDIA H200", the CPU's model name
	Kind        Kind   `json:"kind"`
	// Library and ID are the device's properties as ggml reports them
	// ("CUDA", a UUID); ollama places layers by matching both.
	Library string `json:"library"`
	ID      string `json:"id,omitempty"`
	// Backend is the name of the backend that registered the device
	// ("CPU", "CUDA").
	Backend string `json:"backend"`
	// Loaded is true for a device whose backend came from a shared library
	// at start, false for the CPU backend compiled into the binary.
	Loaded bool `json:"loaded"`
	// Features the backend reports as enabled ("AVX2", "AVX512", ... for a
	// CPU variant; compute capability and the like for CUDA), sorted.
	Features    []string `json:"features,omitempty"`
	FreeMemory  uint64   `json:"free_memory,omitempty"` // bytes, as the backend reports them
	TotalMemory uint64   `json:"total_memory,omitempty"`
}

// IsGPU reports whether layers offloaded to d leave host memory.
func (d Info) IsGPU() bool { return d.Kind == GPU || d.Kind == IGPU }

func (d Info) String() string {
	s := fmt.Sprintf("%s (%s, %s", d.Name, d.Description, d.Kind)
	if d.Loaded {
		s += ", loaded"
	}
	return s + ")"
}

var load sync.Once

// List loads the backend libraries (once per process, as the engine does
// when it opens its first model) and returns every device ggml has, in
// ggml's order: a loaded backend's devices before the compiled-in CPU, so
// Default() is the device a model without offloaded layers runs on.
func List() []Info {
	load.Do(ggmlsrc.OnceLoad)
	builtin := C.ggml_backend_cpu_reg()
	n := int(C.ggml_backend_dev_count())
	out := make([]Info, 0, n)
	for i := 0; i < n; i++ {
		d := C.ggml_backend_dev_get(C.size_t(i))
		var props C.struct_ggml_backend_dev_props
		C.ggml_backend_dev_get_props(d, &props)
		reg := C.ggml_backend_dev_backend_reg(d)
		info := Info{
			Index:       i,
			Name:        C.GoString(C.ggml_backend_dev_name(d)),
			Description: C.GoString(C.ggml_backend_dev_description(d)),
			Library:     goString(props.library),
			ID:          goString(props.id),
			Backend:     C.GoString(C.ggml_backend_reg_name(reg)),
			Loaded:      reg != builtin,
		}
		switch C.ggml_backend_dev_type(d) {
		case C.GGML_BACKEND_DEVICE_TYPE_CPU:
			info.Kind = CPU
		case C.GGML_BACKEND_DEVICE_TYPE_GPU:
			info.Kind = GPU
		case C.GGML_BACKEND_DEVICE_TYPE_IGPU:
			info.Kind = IGPU
		default:
			info.Kind = Accel
		}
		if info.IsGPU() {
			// Asking a CPU backend for memory reads /proc; a GPU's is what
			// offloading has to fit in.
			var free, total C.size_t
			C.ggml_backend_dev_memory(d, &free, &total)
			info.FreeMemory, info.TotalMemory = uint64(free), uint64(total)
		}
		if f := C.kvr_features(reg); f != nil {
			for j := 0; ; j++ {
				e := C.kvr_feature_at(f, C.int(j))
				if e.name == nil {
					break
				}
				if v := C.GoString(e.value); v != "" && v != "0" {
					name := C.GoString(e.name)
					if v != "1" {
						name += "=" + v
					}
					info.Features = append(info.Features, name)
				}
			}
			sort.Strings(info.Features)
		}
		out = append(out, info)
	}
	return out
}

func goString(s *C.char) string {
	if s == nil {
		return ""
	}
	return C.GoString(s)
}

// LibraryPaths are the folders the loader searched for backend libraries.
func LibraryPaths() []string {
	load.Do(ggmlsrc.OnceLoad)
	return ggmlsrc.LibPaths()
}

// Searched says where the loader looked, for messages: the folders, or
// that there were none (OLLAMA_LIBRARY_PATH set but empty).
func Searched() string {
	if p := LibraryPaths(); len(p) > 0 {
		return strings.Join(p, ", ")
	}
	return "no folder (OLLAMA_LIBRARY_PATH is empty)"
}

// Default is the device a model runs on when no layer is offloaded: ggml's
// first CPU device (a loaded CPU variant if the loader found one).
func Default(devs []Info) (Info, error) {
	for _, d := range devs {
		if d.Kind == CPU {
			return d, nil
		}
	}
	return Info{}, fmt.Errorf("device: ggml has no CPU device")
}

// Resolve finds the device a user named: "" or "cpu" for the CPU device
// (Default), "gpu" for the first GPU, or a device name as List gives it
// ("CUDA0"; case does not matter).
func Resolve(devs []Info, name string) (Info, error) {
	switch n := strings.ToLower(strings.TrimSpace(name)); n {
	case "", "cpu":
		return Default(devs)
	case "gpu":
		for _, d := range devs {
			if d.IsGPU() {
				return d, nil
			}
		}
		return Info{}, fmt.Errorf("device %q: no GPU device is loaded (devices: %s; backend libraries searched in %s; build ggml-cuda with make cuda, docs/gpu.md)",
			name, names(devs), Searched())
	default:
		for _, d := range devs {
			if strings.ToLower(d.Name) == n {
				return d, nil
			}
		}
		return Info{}, fmt.Errorf("device %q: no such device (devices: %s; \"cpu\" and \"gpu\" pick the first of each)", name, names(devs))
	}
}

func names(devs []Info) string {
	var s []string
	for _, d := range devs {
		s = append(s, d.Name)
	}
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}
