package niah

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"

	gplot "gonum.org/v1/plot"

	"github.com/kvrecall/kvrecall/bench/plot"
)

// Appender writes rows as JSON lines, one write and sync per row, so that an
// interrupted run keeps every finished cell.
type Appender struct{ f *os.File }

// OpenAppender opens path for appending; a torn last line (a run killed
// while writing it) is ended with a newline so that new rows stay readable.
func OpenAppender(path string) (*Appender, error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	if st, err := f.Stat(); err == nil && st.Size() > 0 {
		last := make([]byte, 1)
		if _, err := f.ReadAt(last, st.Size()-1); err == nil && last[0] != '\n' {
			f.Write([]byte("\n"))
		}
	}
	return &Appender{f: f}, nil
}

// Write appends one row.
func (a *Appender) Write(r Row) error {
	b, err := json.Marshal(r)
	if err != nil {
		return err
	}
	if _, err := a.f.Write(append(b, '\n')); err != nil {
		return err
	}
	return a.f.Sync()
}

// Close closes the file.
func (a *Appender) Close() error { return a.f.Close() }

// Heatmaps draws one heatmap per method and budget into dir (PNG and SVG)
// and all of them side by side as heatmaps.png/.svg. It returns the files'
// base names.
func Heatmaps(rows []Row, dir string) ([]string, error) {
	type series struct {
		method string
		budget int
	}
	groups := map[series][]plot.Cell{}
	for _, r := range rows {
		s := series{r.Method, r.Budget}
		groups[s] = append(groups[s], plot.Cell{Length: r.Length, Depth: r.Depth, Score: r.Score})
	}
	keys := make([]series, 0, len(groups))
	for k := range groups {
		keys = append(keys, k)
	}
	order := []string{"dense", "window", "quest", "retro"}
	sort.Slice(keys, func(i, j int) bool {
		a, b := slices.Index(order, keys[i].method), slices.Index(order, keys[j].method)
		if a != b {
			return a < b
		}
		return keys[i].budget < keys[j].budget
	})
	var plots []*gplot.Plot
	var names []string
	for _, k := range keys {
		title := k.method
		name := k.method
		if k.method != "dense" {
			title = fmt.Sprintf("%s, budget %d", k.method, k.budget)
			name = fmt.Sprintf("%s-%d", k.method, k.budget)
		}
		p, err := plot.Heatmap(title, groups[k])
		if err != nil {
			return names, err
		}
		if err := plot.Save(p, filepath.Join(dir, "heatmap-"+name)); err != nil {
			return names, err
		}
		plots = append(plots, p)
		names = append(names, "heatmap-"+name)
	}
	if len(plots) > 0 {
		if err := plot.SaveRow(plots, filepath.Join(dir, "heatmaps")); err != nil {
			return names, err
		}
		names = append(names, "heatmaps")
	}
	return names, nil
}
