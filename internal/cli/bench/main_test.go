package bench

import (
	"testing"

	"github.com/stretchr/testify/require"

	"github.com/kvrecall/kvrecall/probe"
)

func TestParseIngests(t *testing.T) {
	for _, tc := range []struct {
		spec   string
		layers int
		names  []string
		hyper  [][]int // nil entry: dense; empty: every layer
		err    string
	}{
		{spec: "dense", layers: 6, names: []string{"dense"}, hyper: [][]int{nil}},
		{spec: "dense,hyper:all,hyper:but0,hyper:last,hyper:1+3", layers: 6,
			names: []string{"dense", "hyper:all", "hyper:but0", "hyper:last", "hyper:1+3"},
			hyper: [][]int{nil, {}, {1, 2, 3, 4, 5}, {5}, {1, 3}}},
		{spec: "hyper:but0", layers: 2, names: []string{"hyper:but0"}, hyper: [][]int{{1}}},
		{spec: "hyper:but0", layers: 1, err: "selects no layer"},
		{spec: "dense,streaming", layers: 2, names: []string{"dense", "streaming"}, hyper: [][]int{nil, nil}},
		{spec: "sparse", layers: 2, err: "neither dense, streaming nor hyper"},
		{spec: "hyper:x", layers: 2, err: "not a layer number"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := parseIngests(tc.spec, tc.layers, 1024)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			require.Len(t, got, len(tc.names))
			for i, in := range got {
				require.Equal(t, tc.names[i], in.Name)
				require.Equal(t, in.Name == "streaming", in.Streaming)
				if in.Streaming {
					require.Equal(t, 1024, in.Budget)
				}
				if tc.hyper[i] == nil {
					require.Nil(t, in.Hyper)
					continue
				}
				require.NotNil(t, in.Hyper)
				require.Equal(t, len(tc.hyper[i]), len(in.Hyper.Layers))
				for j, l := range tc.hyper[i] {
					require.Equal(t, l, in.Hyper.Layers[j])
				}
			}
		})
	}
}

func TestProbeExtra(t *testing.T) {
	for _, tc := range []struct {
		spec string
		want *probe.Settings // nil: no Extra
		err  string
	}{
		{spec: ""},
		{spec: `{"block_size":128,"question_weight":4,"neighbors":-1}`, want: &probe.Settings{BlockSize: 128, QuestionWeight: 4, Neighbors: -1}},
		{spec: `{"uniform":true}`, want: &probe.Settings{Uniform: true}},
		{spec: `{"blocksize":128}`, err: `unknown field "blocksize"`},
		{spec: `{"block_size":"big"}`, err: "block_size"},
		{spec: `[1]`, err: "--probe"},
	} {
		t.Run(tc.spec, func(t *testing.T) {
			got, err := probeExtra(tc.spec)
			if tc.err != "" {
				require.ErrorContains(t, err, tc.err)
				return
			}
			require.NoError(t, err)
			if tc.want == nil {
				require.Nil(t, got)
				return
			}
			require.Equal(t, *tc.want, got[probe.OptionKey])
		})
	}
}
