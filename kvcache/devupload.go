package kvcache

/*
#include <stdlib.h>
#include "ggml.h"
#include "ggml-backend.h"
*/
import "C"

import (
	"fmt"
	"unsafe"

	"github.com/ollama/ollama/ml"
	"github.com/ollama/ollama/ml/backend/ggml"

	"github.com/kvrecall/kvrecall/internal/backendmem"
)

// Device uploads: pages into a pool outside host memory (a GPU layer's).
//
// The graph-input path (copyRuns) makes two fresh input tensors per pool
// and graph. ollama allocates each input its own host buffer (page faults
// on first touch), and the scheduler copies it to the device from
// pageable memory when the graph starts, on the stream that computes.
// Here instead the host packs a pass's pages into a host arena (pinned
// where the device has a host buffer type: CUDA's cudaMallocHost) and
// ggml_backend_tensor_set_async copies them into staging tensors in
// device memory, on a backend instance of the cache's own (on CUDA, a
// stream of its own). The copies run while the host builds the rest of the
// graph. The graph then copies from the staging views into the pool's
// slots on the device: the same runs as copyRuns, the same bytes.
//
// Outputs, which every compute path calls before it computes (arch.Hooks),
// waits for the copies (wait). Where the backend has no asynchronous set
// (the CPU backend), ggml makes the set a plain copy.

// DeviceUploads turns device uploads on. Off, pools outside host memory
// take the graph-input path. Tests turn it off to check that both write the
// same bytes, and on for pools in host memory (with HostUploads off) to run
// this path on the CPU backend.
var DeviceUploads = true

// DeviceStagePages sizes a pool's staging tensors, in pages (never more
// than the pool's slots): they add that much device memory per pool. A
// pass that uploads more into one pool (the first pass of a session, a
// pool that grew) takes the graph-input path; decode steps upload a few
// pages per pool.
var DeviceStagePages = 8

// stage is a pool's staging tensors in device memory, made on its first
// device upload. k and v hold a pass's uploads packed as copyRuns packs
// its inputs: keys token-major, values run by run channel-major.
//
//	k, v: [cells·row] f16, cells = min(slots, DeviceStagePages)·pageSize
type stage struct {
	ctx   ml.Context
	k, v  ml.Tensor
	cells int
	// up is the uploader whose copies into k and v may be in flight:
	// the pool waits for it before it frees them (pool.close).
	up *uploader
	// graph is the Paged.graphs count when k and v were last written: a
	// graph reads them when it computes, so a second upload into the same
	// graph must not overwrite them (it takes graph inputs instead).
	graph  uint64
	filled bool
}

// uploader issues one cache's uploads to one device. Its arena holds what
// the copies read until they finish.
//
// Invariants: 0 <= used <= size; pending only if copies were issued since
// the last wait; nothing in [0, used) of the arena is written until wait.
type uploader struct {
	dev     C.ggml_backend_dev_t
	be      C.ggml_backend_t
	hostBuf C.ggml_backend_buffer_t // the arena when the device has a host buffer type, else nil (malloc)
	arena   unsafe.Pointer
	size    int // bytes
	used    int // bytes handed out since the last wait
	pending bool
	pinned  bool           // the arena is the device's host buffer type (pinned)
	later   []deferredCopy // deferCopies: copies wait makes
}

// deferCopies makes set only record its copies, which wait then makes:
// the CPU backend behaving as an asynchronous device does, where a graph
// computed before the wait reads staging tensors the copies have not
// reached. The package's tests turn it on (export_test.go).
var deferCopies bool

type deferredCopy struct {
	t   *C.struct_ggml_tensor
	src unsafe.Pointer
	n   int
}

// arenaAlign keeps every reservation cache-line aligned (and DMA friendly).
const arenaAlign = 64

// newUploader makes an uploader for dev, or returns an error if ggml cannot
// start a backend on it.
func newUploader(dev C.ggml_backend_dev_t) (*uploader, error) {
	be := C.ggml_backend_dev_init(dev, nil)
	if be == nil {
		return nil, fmt.Errorf("kvcache: ggml could not start a backend on %s for uploads", C.GoString(C.ggml_backend_dev_name(dev)))
	}
	return &uploader{dev: dev, be: be}, nil
}

// reserve returns n bytes of the arena for copies issued before the next
// wait. A full arena waits for the copies in flight and starts over; one
// too small is replaced by one twice the size that fits n.
func (u *uploader) reserve(n int) (unsafe.Pointer, error) {
	n = (n + arenaAlign - 1) / arenaAlign * arenaAlign
	if u.used+n > u.size {
		u.wait()
	}
	if n > u.size {
		u.freeArena()
		size := max(n, 2*u.size, 1<<20)
		if hbt := C.ggml_backend_dev_host_buffer_type(u.dev); hbt != nil {
			if buf := C.ggml_backend_buft_alloc_buffer(hbt, C.size_t(size)); buf != nil {
				u.hostBuf, u.arena, u.pinned = buf, C.ggml_backend_buffer_get_base(buf), true
			}
		}
		if u.arena == nil {
			if u.arena = C.malloc(C.size_t(size)); u.arena == nil {
				return nil, fmt.Errorf("kvcache: out of host memory for a %d-byte upload arena", size)
			}
			u.pinned = false
		}
		u.size = size
	}
	p := unsafe.Add(u.arena, u.used)
	u.used += n
	return p, nil
}

// set copies n bytes at src (in the arena) into t from byte 0, on the
// uploader's backend: asynchronous where the backend allows.
func (u *uploader) set(t ml.Tensor, src unsafe.Pointer, n int) {
	if deferCopies {
		u.later = append(u.later, deferredCopy{ggmlOf(t), src, n})
	} else {
		C.ggml_backend_tensor_set_async(u.be, ggmlOf(t), src, 0, C.size_t(n))
	}
	u.pending = true
}

// wait returns once every copy issued has finished; the arena is free again.
func (u *uploader) wait() {
	if u.pending {
		for _, d := range u.later {
			C.ggml_backend_tensor_set(d.t, d.src, 0, C.size_t(d.n))
		}
		u.later = u.later[:0]
		C.ggml_backend_synchronize(u.be)
		u.pending = false
	}
	u.used = 0
}

func (u *uploader) freeArena() {
	if u.hostBuf != nil {
		C.ggml_backend_buffer_free(u.hostBuf)
	} else if u.arena != nil {
		C.free(u.arena)
	}
	u.hostBuf, u.arena, u.size, u.used = nil, nil, 0, 0
}

func (u *uploader) close() {
	u.wait()
	u.freeArena()
	if u.be != nil {
		C.ggml_backend_free(u.be)
		u.be = nil
	}
}

// ggmlOf is t's ggml tensor, or nil if t is not one of ollama's ggml
// backend's tensors.
func ggmlOf(t ml.Tensor) *C.struct_ggml_tensor {
	gt, ok := t.(*ggml.Tensor)
	if !ok || gt == nil {
		return nil
	}
	return (*ggmlTensor)(unsafe.Pointer(gt)).t
}

// tensorDevice returns the device of t's buffer, or nil.
func tensorDevice(t ml.Tensor) C.ggml_backend_dev_t {
	ct := ggmlOf(t)
	if ct == nil {
		return nil
	}
	buf := ct.buffer
	if ct.view_src != nil {
		buf = ct.view_src.buffer
	}
	if buf == nil {
		return nil
	}
	if dev := C.ggml_backend_buft_get_device(C.ggml_backend_buffer_get_type(buf)); dev != nil {
		return dev
	}
	if C.ggml_backend_buffer_is_host(buf) {
		// ggml's CPU buffer type names no device (a FIXME in
		// ggml-backend.cpp): host memory is the CPU's.
		return C.ggml_backend_dev_by_type(C.GGML_BACKEND_DEVICE_TYPE_CPU)
	}
	return nil
}

// uploaderFor returns the cache's uploader for t's device, made on first
// use, or nil (device uploads then fall back to the graph-input path) if
// t has no device or ggml cannot start a backend on it.
func (c *Paged) uploaderFor(t ml.Tensor) *uploader {
	dev := tensorDevice(t)
	if dev == nil {
		return nil
	}
	for _, u := range c.uploaders {
		if u.dev == dev {
			return u
		}
	}
	u, err := newUploader(dev)
	if err != nil {
		c.noUploader = true
		return nil
	}
	c.uploaders = append(c.uploaders, u)
	return u
}

// waitUploads waits for every device upload issued: before a graph that
// reads the staging tensors computes (Outputs), and before Close frees
// them. Reports whether any was in flight.
func (c *Paged) waitUploads() bool {
	inFlight := false
	for _, u := range c.uploaders {
		inFlight = inFlight || u.pending
		u.wait()
	}
	return inFlight
}

// stagedCell is a slot (page pools) or cell (token pools) that a graph
// not yet computed and handed to Computed fills, from staging or from
// graph inputs: if that graph computes before the wait, or never finishes
// computing, the cell may hold stale rows and must be uploaded again.
type stagedCell struct {
	pl        *pool
	slot, key int // page pools: slot and page; token pools: cell and position
}

// unstage forgets the cells of graphs that computed before their copies
// were waited for (Computed), or whose compute never finished
// (StartForward): their pages are uploaded again next pass, and so are the
// key boxes such graphs copied (every row of the box tensor: rare).
func (c *Paged) unstage() {
	for _, sc := range c.unwaited {
		pl := sc.pl
		if pl.tok != nil {
			if pl.tok.pos[sc.slot] == int32(sc.key) {
				pl.tok.free(int32(sc.slot))
			}
		} else if sc.slot < len(pl.page) && pl.page[sc.slot] == sc.key {
			pl.fill[sc.slot] = 0
		}
	}
	c.unwaited = c.unwaited[:0]
	for _, bt := range c.unwaitedBoxes {
		clear(bt.state)
		bt.scanFrom = 0
	}
	c.unwaitedBoxes = c.unwaitedBoxes[:0]
}

// stagingTensors returns pl's staging tensors for up to cells cells,
// made on first use in the pool's layer context (the layer's device), or
// nil if the backend refuses the memory: the pool then keeps the
// graph-input path.
func (c *Paged) stagingTensors(pl *pool) (st *stage) {
	if pl.stage != nil || pl.noStage {
		return pl.stage
	}
	cells := min(pl.slots, DeviceStagePages) * c.L.PageSize
	defer func() {
		if r := recover(); r != nil { // ollama panics with ml.ErrNoMem
			if st != nil && st.ctx != nil {
				st.ctx.Close()
			}
			pl.noStage, st = true, nil
		}
	}()
	st = &stage{cells: cells}
	backendmem.Do(func() {
		st.ctx = c.b.NewContextSize(2).Layer(pl.layer)
		st.k = st.ctx.Empty(ml.DTypeF16, cells*pl.row)
		st.v = st.ctx.Empty(ml.DTypeF16, cells*pl.row)
	})
	pl.stage = st
	return st
}

// deviceUploads uploads ups into g's pool through its staging tensors and
// reports whether it did; false leaves them to the graph-input path (off,
// too many rows for the staging tensors, too many copy runs for the graph,
// no memory, or no backend for the device).
func (c *Paged) deviceUploads(ctx ml.Context, l int, g *group, ups []upload) bool {
	runs, _, _ := planRuns(ups, c.L.PageSize)
	total := 0
	for _, u := range ups {
		total += u.rows
	}
	if len(runs) > MaxUploadRuns-c.graphRuns[ctx] {
		return false
	}
	ds, ok := c.stageFor(g.pool, total)
	if !ok {
		return false
	}
	if n := c.packRuns(ds.k[:0], ds.v, l, g, runs); n != len(ds.k) {
		panic(fmt.Sprintf("kvcache: packed %d key elements into staging of %d", n, len(ds.k)))
	}
	ds.send()
	c.graphRuns[ctx] += len(runs)
	c.copyRunsFrom(ctx, g, runs, ds.st.k, ds.st.v)
	c.deviceStaged.Add(int64(len(ups)))
	return true
}

// deviceStage is one pass's upload into a pool's staging tensors: k and v
// are the arena's bytes for the keys and values, filled by the caller
// before send.
type deviceStage struct {
	st   *stage
	u    *uploader
	k, v []uint16
}

// stageFor readies an upload of cells cells (rows of pl.row) into pl's
// staging tensors, or reports false: device uploads off, more cells than
// the staging tensors hold, no memory, or no backend for the device.
func (c *Paged) stageFor(pl *pool, cells int) (deviceStage, bool) {
	if !DeviceUploads || DeviceStagePages <= 0 || c.noUploader || pl.noStage || c.b == nil ||
		cells > min(pl.slots, DeviceStagePages)*c.L.PageSize {
		return deviceStage{}, false
	}
	// The device first: no staging tensors where no copy could reach them.
	u := c.uploaderFor(pl.k)
	if u == nil {
		pl.noStage = true
		return deviceStage{}, false
	}
	st := c.stagingTensors(pl)
	if st == nil || cells > st.cells || // made when DeviceStagePages was smaller
		(st.filled && st.graph == c.graphs) { // this graph reads what they hold
		return deviceStage{}, false
	}
	n := cells * pl.row // elements of keys, and of values
	mem, err := u.reserve(4 * n)
	if err != nil {
		return deviceStage{}, false
	}
	st.filled, st.graph = true, c.graphs
	return deviceStage{st: st, u: u, k: unsafe.Slice((*uint16)(mem), n), v: unsafe.Slice((*uint16)(unsafe.Add(mem, 2*n)), n)}, true
}

// send issues the copies of k and v into the staging tensors' first bytes.
func (ds deviceStage) send() {
	n := 2 * len(ds.k)
	ds.st.up = ds.u
	ds.u.set(ds.st.k, unsafe.Pointer(&ds.k[0]), n)
	ds.u.set(ds.st.v, unsafe.Pointer(&ds.v[0]), n)
}

// close frees the staging tensors once no copy into them is in flight.
func (st *stage) close() {
	if st.up != nil {
		st.up.wait()
	}
	st.ctx.Close()
}
