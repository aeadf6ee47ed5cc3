// Package plot draws benchmark figures with gonum/plot: needle-in-a-haystack
// heatmaps (depth x context length, red-yellow-green over 0-100 %, as in
// gkamradt's LLMTest_NeedleInAHaystack), several heatmaps side by side, and
// line plots of speed against context length. Every figure is written as PNG
// and SVG.
package plot

import (
	"fmt"
	"image/color"
	"math"
	"os"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/palette"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/vg"
	"gonum.org/v1/plot/vg/draw"
	"gonum.org/v1/plot/vg/vgimg"
	"gonum.org/v1/plot/vg/vgsvg"
)

// Cell is one heatmap value: a score in [0, 100] at a length and depth.
type Cell struct {
	Length int
	Depth  float64 // percent
	Score  float64 // percent
}

// stops are the NIAH colours: red at 0 %, yellow at 50 %, green at 100 %.
var stops = []color.RGBA{{0xF0, 0x49, 0x6E, 0xFF}, {0xEB, 0xB8, 0x39, 0xFF}, {0x0C, 0xD7, 0x9F, 0xFF}}

type gradient struct{ n int }

func (g gradient) Colors() []color.Color {
	out := make([]color.Color, g.n)
	for i := range out {
		out[i] = At(float64(i) / float64(g.n-1) * 100)
	}
	return out
}

// At returns the heatmap colour of a score in [0, 100].
func At(score float64) color.RGBA {
	x := math.Max(0, math.Min(1, score/100)) * float64(len(stops)-1)
	i := int(math.Min(x, float64(len(stops)-2)))
	f := x - float64(i)
	a, b := stops[i], stops[i+1]
	mix := func(p, q uint8) uint8 { return uint8(float64(p) + f*(float64(q)-float64(p)) + 0.5) }
	return color.RGBA{mix(a.R, b.R), mix(a.G, b.G), mix(a.B, b.B), 0xFF}
}

var _ palette.Palette = gradient{}

// grid is the heatmap data: columns are lengths, rows depths.
type grid struct {
	lengths []int
	depths  []float64
	z       [][]float64 // [row][col]; NaN where no cell
}

func (g *grid) Dims() (c, r int)   { return len(g.lengths), len(g.depths) }
func (g *grid) Z(c, r int) float64 { return g.z[r][c] }
func (g *grid) X(c int) float64    { return float64(c) }
func (g *grid) Y(r int) float64    { return float64(r) }

func newGrid(cells []Cell) *grid {
	g := &grid{}
	for _, c := range cells {
		if !slices.Contains(g.lengths, c.Length) {
			g.lengths = append(g.lengths, c.Length)
		}
		if !slices.Contains(g.depths, c.Depth) {
			g.depths = append(g.depths, c.Depth)
		}
	}
	slices.Sort(g.lengths)
	slices.Sort(g.depths)
	g.z = make([][]float64, len(g.depths))
	count := make([][]int, len(g.depths))
	for r := range g.z {
		g.z[r] = make([]float64, len(g.lengths))
		count[r] = make([]int, len(g.lengths))
	}
	for _, c := range cells {
		r, col := slices.Index(g.depths, c.Depth), slices.Index(g.lengths, c.Length)
		g.z[r][col] += c.Score
		count[r][col]++
	}
	for r := range g.z {
		for col := range g.z[r] {
			if count[r][col] == 0 {
				g.z[r][col] = math.NaN()
			} else {
				g.z[r][col] /= float64(count[r][col])
			}
		}
	}
	return g
}

func lengthLabel(n int) string {
	if n >= 1024 && n%1024 == 0 {
		return fmt.Sprintf("%dk", n/1024)
	}
	return fmt.Sprint(n)
}

// Heatmap returns a NIAH heatmap: x = context length, y = depth (0 % at the
// top, as in the reference plots), colour = mean score of the cell.
func Heatmap(title string, cells []Cell) (*plot.Plot, error) {
	if len(cells) == 0 {
		return nil, fmt.Errorf("plot: no cells for %q", title)
	}
	g := newGrid(cells)
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = "context length (tokens)"
	p.Y.Label.Text = "needle depth"
	h := plotter.NewHeatMap(g, gradient{n: 101})
	h.Min, h.Max = 0, 100
	h.NaN = color.RGBA{0xDD, 0xDD, 0xDD, 0xFF}
	p.Add(h)
	var xt, yt []plot.Tick
	for i, l := range g.lengths {
		xt = append(xt, plot.Tick{Value: float64(i), Label: lengthLabel(l)})
	}
	for i, d := range g.depths {
		yt = append(yt, plot.Tick{Value: float64(i), Label: fmt.Sprintf("%.0f%%", d)})
	}
	p.X.Tick.Marker = plot.ConstantTicks(xt)
	p.Y.Tick.Marker = plot.ConstantTicks(yt)
	p.X.Min, p.X.Max = -0.5, float64(len(g.lengths))-0.5
	p.Y.Min, p.Y.Max = -0.5, float64(len(g.depths))-0.5
	p.Y.Scale = flipped{}
	return p, nil
}

// flipped puts the first row (depth 0 %) at the top.
type flipped struct{}

func (flipped) Normalize(min, max, x float64) float64 { return (max - x) / (max - min) }

// Size of one figure.
var (
	Width  = 6 * vg.Inch
	Height = 4 * vg.Inch
)

// Save writes p to base.png and base.svg.
func Save(p *plot.Plot, base string) error {
	for _, ext := range []string{".png", ".svg"} {
		if err := p.Save(Width, Height, base+ext); err != nil {
			return fmt.Errorf("plot: %w", err)
		}
	}
	return nil
}

// Columns is the most figures side by side before SaveRow starts a new row.
const Columns = 4

// SaveRow draws plots side by side (Columns per row) and writes base.png and
// base.svg.
func SaveRow(ps []*plot.Plot, base string) error {
	if len(ps) == 0 {
		return fmt.Errorf("plot: nothing to draw")
	}
	cols := min(Columns, len(ps))
	rows := (len(ps) + cols - 1) / cols
	w, h := Width*vg.Length(cols), Height*vg.Length(rows)
	for _, ext := range []string{".png", ".svg"} {
		var canvas vg.CanvasWriterTo
		switch ext {
		case ".png":
			canvas = vgimg.PngCanvas{Canvas: vgimg.New(w, h)}
		default:
			canvas = vgsvg.New(w, h)
		}
		dc := draw.New(canvas)
		tiles := draw.Tiles{Rows: rows, Cols: cols}
		for i, p := range ps {
			p.Draw(tiles.At(dc, i%cols, i/cols))
		}
		f, err := os.Create(base + ext)
		if err != nil {
			return err
		}
		if _, err := canvas.WriteTo(f); err != nil {
			f.Close()
			return err
		}
		if err := f.Close(); err != nil {
			return err
		}
	}
	return nil
}

// Series is one line of a line plot.
type Series struct {
	Name string
	X, Y []float64
}

// Lines returns a line plot with points.
func Lines(title, xlabel, ylabel string, series []Series) (*plot.Plot, error) {
	p := plot.New()
	p.Title.Text = title
	p.X.Label.Text = xlabel
	p.Y.Label.Text = ylabel
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	for i, s := range series {
		pts := make(plotter.XYs, len(s.X))
		for j := range s.X {
			pts[j].X, pts[j].Y = s.X[j], s.Y[j]
		}
		l, sc, err := plotter.NewLinePoints(pts)
		if err != nil {
			return nil, err
		}
		col := plotColor(i)
		l.Color, sc.Color = col, col
		sc.Shape = draw.CircleGlyph{}
		if i >= numColors {
			// Past the palette, colours repeat: dash the line and change
			// the marker so that every series stays distinguishable.
			l.Dashes = []vg.Length{vg.Points(4), vg.Points(2)}
			sc.Shape = draw.TriangleGlyph{}
		}
		p.Add(l, sc)
		p.Legend.Add(s.Name, l, sc)
	}
	return p, nil
}

// numColors is the size of plotColor's palette.
const numColors = 8

func plotColor(i int) color.Color {
	cs := [numColors]color.RGBA{{0x1f, 0x77, 0xb4, 0xff}, {0xd6, 0x27, 0x28, 0xff}, {0x2c, 0xa0, 0x2c, 0xff},
		{0xff, 0x7f, 0x0e, 0xff}, {0x94, 0x67, 0xbd, 0xff}, {0x8c, 0x56, 0x4b, 0xff},
		{0xe3, 0x77, 0xc2, 0xff}, {0x17, 0xbe, 0xcf, 0xff}}
	return cs[i%numColors]
}
