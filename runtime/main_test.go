package runtime_test

import (
	"os"
	"testing"

	"github.com/kvrecall/kvrecall/internal/testmodels"
)

func TestMain(m *testing.M) {
	testmodels.Quiet()
	if os.Getenv(loadedChildEnv) != "" {
		deviceChild() // TestLoadedCPUBackend's child; exits
	}
	// Which backends load must not depend on the caller's environment.
	testmodels.NoBackendLibraries()
	os.Exit(m.Run())
}
