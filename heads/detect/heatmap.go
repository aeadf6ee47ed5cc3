package detect

import (
	"fmt"
	"image/color"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"

	kvplot "github.com/kvrecall/kvrecall/bench/plot"
	"github.com/kvrecall/kvrecall/heads"
)

// scoreGrid is a profile's scores as a heatmap grid: x = query head,
// y = layer (layer 0 at the top).
type scoreGrid struct{ s [][]float64 }

func (g scoreGrid) Dims() (c, r int)   { return len(g.s[0]), len(g.s) }
func (g scoreGrid) Z(c, r int) float64 { return min(1, max(0, g.s[r][c])) }
func (g scoreGrid) X(c int) float64    { return float64(c) }
func (g scoreGrid) Y(r int) float64    { return float64(r) }

type scorePalette struct{}

// Colors runs from red (score 0) to green (1), the NIAH heatmap colours.
func (scorePalette) Colors() []color.Color {
	out := make([]color.Color, 101)
	for i := range out {
		out[i] = kvplot.At(float64(i))
	}
	return out
}

type topDown struct{}

func (topDown) Normalize(min, max, x float64) float64 { return (max - x) / (max - min) }

// Heatmap writes p's scores as a PNG: one cell per layer and query head,
// red at 0 and green at 1. The title names the model, the method and the
// heads above the threshold.
func Heatmap(p *heads.Profile, path string) error {
	if len(p.Scores) == 0 || len(p.Scores[0]) == 0 {
		return fmt.Errorf("heads: heatmap %s: no scores", path)
	}
	pl := plot.New()
	pl.Title.Text = fmt.Sprintf("%s: %s scores, %d heads > %g", p.Model, p.Method, len(p.RetrievalHeads()), p.Threshold)
	pl.X.Label.Text = "query head"
	pl.Y.Label.Text = "layer"
	h := plotter.NewHeatMap(scoreGrid{p.Scores}, scorePalette{})
	h.Min, h.Max = 0, 1
	pl.Add(h)
	pl.X.Min, pl.X.Max = -0.5, float64(p.Heads)-0.5
	pl.Y.Min, pl.Y.Max = -0.5, float64(p.Layers)-0.5
	pl.Y.Scale = topDown{}
	ticks := func(n int) plot.ConstantTicks {
		step := max(1, n/16)
		var t []plot.Tick
		for i := 0; i < n; i += step {
			t = append(t, plot.Tick{Value: float64(i), Label: fmt.Sprint(i)})
		}
		return t
	}
	pl.X.Tick.Marker = ticks(p.Heads)
	pl.Y.Tick.Marker = ticks(p.Layers)
	w := vg.Length(max(4, min(12, 2+0.3*float64(p.Heads)))) * vg.Inch
	hgt := vg.Length(max(3, min(12, 1.5+0.3*float64(p.Layers)))) * vg.Inch
	if filepath.Ext(path) != ".png" {
		return fmt.Errorf("heads: heatmap %s: want a .png file", path)
	}
	if err := pl.Save(w, hgt, path); err != nil {
		return fmt.Errorf("heads: heatmap %s: %w", path, err)
	}
	return nil
}
