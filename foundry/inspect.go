package foundry

// Attention evaluates prompt with the float64 reference forward pass and
// returns the attention weights of its last token, [layer][query head]
// [position]. Tests check the engine's per-head attention against it.
func (r *Recall) Attention(prompt []int32) [][][]float64 {
	st := newRefState(r.model)
	for i, t := range prompt {
		st.step(t, i == len(prompt)-1)
	}
	return st.lastAttn
}
