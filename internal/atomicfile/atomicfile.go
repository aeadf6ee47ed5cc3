// Package atomicfile writes files so that readers see either the old file or
// the complete new one, never a half-written file: write to a temporary file
// in the same directory, fsync, rename over the target, fsync the directory.
package atomicfile

import (
	"fmt"
	"os"
	"path/filepath"
)

// Fault is a seam for tests, nil otherwise. Write calls it with the target
// path at two steps: "written", once the content is in the temporary file
// (an error there is a failed write, as on a full disk), and "renamed", once
// the file replaced the target (an error there is a failed directory sync:
// the new content may be visible). Crash tests kill the process from it.
var Fault func(path, step string) error

func fault(path, step string) error {
	if Fault == nil {
		return nil
	}
	return Fault(path, step)
}

// Write creates path by calling fill with a temporary file in the same
// directory. If fill or any step fails, the temporary file is removed and the
// previous content of path (if any) is untouched.
func Write(path string, perm os.FileMode, fill func(f *os.File) error) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp-*")
	if err != nil {
		return fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	defer func() {
		if err != nil {
			tmp.Close()
			os.Remove(tmp.Name())
		}
	}()
	if err = fill(tmp); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = fault(path, "written"); err != nil {
		return fmt.Errorf("write %s: %w", path, err)
	}
	if err = tmp.Sync(); err != nil {
		return fmt.Errorf("sync %s: %w", path, err)
	}
	if err = tmp.Chmod(perm); err != nil {
		return fmt.Errorf("chmod %s: %w", path, err)
	}
	if err = tmp.Close(); err != nil {
		return fmt.Errorf("close %s: %w", path, err)
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return fmt.Errorf("rename into %s: %w", path, err)
	}
	if err := fault(path, "renamed"); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return SyncDir(dir)
}

// WriteBytes atomically replaces path with data.
func WriteBytes(path string, data []byte, perm os.FileMode) error {
	return Write(path, perm, func(f *os.File) error {
		_, err := f.Write(data)
		return err
	})
}

// SyncDir fsyncs a directory so that a rename inside it survives a crash.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("sync directory %s: %w", dir, err)
	}
	return nil
}
