package foundry

import (
	"math"
	"testing"
)

func TestPositionalProfileSeparatesPreviousToken(t *testing.T) {
	var theta []float64
	for i := 0; i < 64; i++ {
		th := math.Pow(1e16, -float64(2*i)/128)
		if th*131072 >= 0.5 {
			theta = append(theta, th)
		}
	}
	w, gap := positionalProfile(theta, 64, 1, 131072, 300)
	t.Logf("pairs %d w0 %.3f gap %.2f nats", len(theta), w[0], gap)
	if gap < 12 {
		t.Fatalf("previous-token head separates by only %.2f nats, want >= 12", gap)
	}
}
