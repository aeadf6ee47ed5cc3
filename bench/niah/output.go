package niah

import (
	"fmt"
	"path/filepath"
	"slices"
	"sort"
	"strings"

	gplot "gonum.org/v1/plot"

	"github.com/kvrecall/kvrecall/bench/plot"
)

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
		if r.Ingest != "" {
			// A document ingested otherwise is its own series.
			s.method += "@" + r.Ingest
		}
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
		if base, _, _ := strings.Cut(k.method, "@"); base != "dense" {
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
