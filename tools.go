//go:build tools

// This file pins modules the build uses without importing them in code:
// malgo ships miniaudio.h, which ollama's llama.cpp package includes but its
// module zip lacks (see scripts/setup-build.sh).
package kvrecall

import _ "github.com/gen2brain/malgo"
