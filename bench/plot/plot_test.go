package plot

import (
	"image/png"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/require"
	gplot "gonum.org/v1/plot"
	"gonum.org/v1/plot/vg"
)

func TestColours(t *testing.T) {
	require.Equal(t, stops[0], At(0))
	require.Equal(t, stops[1], At(50))
	require.Equal(t, stops[2], At(100))
	require.Equal(t, stops[2], At(250), "clamped")
}

func TestHeatmapFiles(t *testing.T) {
	var cells []Cell
	for _, l := range []int{1024, 4096, 16384} {
		for _, d := range []float64{0, 25, 50, 75, 100} {
			cells = append(cells, Cell{Length: l, Depth: d, Score: d})
		}
	}
	p, err := Heatmap("retro, budget 1024", cells)
	require.NoError(t, err)
	dir := t.TempDir()
	base := filepath.Join(dir, "retro")
	require.NoError(t, Save(p, base))
	f, err := os.Open(base + ".png")
	require.NoError(t, err)
	img, err := png.Decode(f)
	f.Close()
	require.NoError(t, err)
	dpi := 96.0
	require.Equal(t, int(Width.Dots(dpi)+0.5), img.Bounds().Dx())
	require.Equal(t, int(Height.Dots(dpi)+0.5), img.Bounds().Dy())
	svg, err := os.ReadFile(base + ".svg")
	require.NoError(t, err)
	require.True(t, strings.Contains(string(svg), "<svg"))
	require.Contains(t, string(svg), "16k")

	// Side by side: one tile per method.
	require.NoError(t, SaveRow([]*gplot.Plot{p, p, p}, filepath.Join(dir, "all")))
	f, err = os.Open(filepath.Join(dir, "all.png"))
	require.NoError(t, err)
	img, err = png.Decode(f)
	f.Close()
	require.NoError(t, err)
	require.Equal(t, int((3*Width).Dots(dpi)+0.5), img.Bounds().Dx())
	require.Equal(t, int(Height.Dots(dpi)+0.5), img.Bounds().Dy())
	// More than Columns figures wrap onto a second row.
	require.NoError(t, SaveRow([]*gplot.Plot{p, p, p, p, p, p}, filepath.Join(dir, "six")))
	f, err = os.Open(filepath.Join(dir, "six.png"))
	require.NoError(t, err)
	img, err = png.Decode(f)
	f.Close()
	require.NoError(t, err)
	require.Equal(t, int((4*Width).Dots(dpi)+0.5), img.Bounds().Dx())
	require.Equal(t, int((2*Height).Dots(dpi)+0.5), img.Bounds().Dy())

	_, err = Heatmap("empty", nil)
	require.Error(t, err)
	_ = vg.Inch
}

func TestLines(t *testing.T) {
	p, err := Lines("decode", "context", "ms/token", []Series{{Name: "dense", X: []float64{1, 2}, Y: []float64{3, 6}}, {Name: "retro", X: []float64{1, 2}, Y: []float64{1, 1}}})
	require.NoError(t, err)
	require.NoError(t, Save(p, filepath.Join(t.TempDir(), "lines")))
}
