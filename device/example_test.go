package device_test

import (
	"fmt"

	"github.com/kvrecall/kvrecall/device"
)

// Resolve turns what a user typed (--device) into one of the devices ggml
// has; "cpu" is the first CPU device, where layers that are not offloaded
// run.
func ExampleResolve() {
	devs := device.List()
	d, err := device.Resolve(devs, "cpu")
	if err != nil {
		panic(err)
	}
	fmt.Println(d.Name, d.Kind)
	_, err = device.Resolve(devs, "gpu")
	fmt.Println(err != nil)
	// Output:
	// CPU cpu
	// true
}
