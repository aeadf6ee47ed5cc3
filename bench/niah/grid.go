package niah

import (
	"fmt"
	"math"
	"strings"
)

// Depths returns n needle depths in [0, 1]. Linear spacing is even; sigmoid
// spacing (as in LLMTest_NeedleInAHaystack) puts more depths near the start
// and the end of the context, where models differ most.
func Depths(n int, spacing string) ([]float64, error) {
	if n < 1 {
		return nil, fmt.Errorf("need at least one depth")
	}
	if n == 1 {
		return []float64{0.5}, nil
	}
	out := make([]float64, n)
	switch strings.ToLower(spacing) {
	case "", "linear":
		for i := range out {
			out[i] = float64(i) / float64(n-1)
		}
	case "sigmoid":
		lo, hi := logistic(-6), logistic(6)
		for i := range out {
			x := -6 + 12*float64(i)/float64(n-1)
			out[i] = (logistic(x) - lo) / (hi - lo)
		}
	default:
		return nil, fmt.Errorf("unknown depth spacing %q (linear, sigmoid)", spacing)
	}
	for i := range out {
		out[i] = math.Round(out[i]*1000) / 1000
	}
	return out, nil
}

func logistic(x float64) float64 { return 1 / (1 + math.Exp(-x)) }
