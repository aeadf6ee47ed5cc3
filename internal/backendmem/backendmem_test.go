package backendmem

import (
	"sync"
	"testing"
)

// Do's callers never overlap: a plain counter written from many
// goroutines through Do ends exact (and the race detector, which make
// test runs on this package's users, stays quiet).
func TestDoSerializes(t *testing.T) {
	const goroutines, each = 8, 1000
	n := 0
	var wg sync.WaitGroup
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range each {
				Do(func() { n++ })
			}
		}()
	}
	wg.Wait()
	if n != goroutines*each {
		t.Fatalf("counter %d after %d increments under Do", n, goroutines*each)
	}
}
