// Package ruler generates the RULER tasks that need no outside data
// (NVIDIA RULER, arXiv 2404.06654: niah_single, niah_multikey,
// niah_multivalue, niah_multiquery, variable tracking, common- and
// frequent-words extraction), runs them under each paging method and scores
// them with RULER's string_match_all and string_match_part.
package ruler

import "strings"

// StringMatchAll is RULER's string_match_all for one sample: the fraction of
// references found in the prediction (case-insensitive), times 100.
func StringMatchAll(pred string, refs []string) float64 {
	if len(refs) == 0 {
		return 0
	}
	p := strings.ToLower(pred)
	found := 0
	for _, r := range refs {
		if strings.Contains(p, strings.ToLower(r)) {
			found++
		}
	}
	return 100 * float64(found) / float64(len(refs))
}

// StringMatchPart is RULER's string_match_part for one sample: 100 if any
// reference is found in the prediction (case-insensitive), else 0.
func StringMatchPart(pred string, refs []string) float64 {
	p := strings.ToLower(pred)
	for _, r := range refs {
		if strings.Contains(p, strings.ToLower(r)) {
			return 100
		}
	}
	return 0
}

// Metric names a scoring function.
type Metric string

const (
	MatchAll  Metric = "string_match_all"
	MatchPart Metric = "string_match_part"
)

// Score applies the metric.
func (m Metric) Score(pred string, refs []string) float64 {
	if m == MatchPart {
		return StringMatchPart(pred, refs)
	}
	return StringMatchAll(pred, refs)
}
