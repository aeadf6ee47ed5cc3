//go:build !unix

package store

import "os"

// lockFile: without flock, a process assumes it owns its data folder.
func lockFile(*os.File) bool { return true }
