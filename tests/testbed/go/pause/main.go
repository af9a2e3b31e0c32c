// Command pause is the test bed's pod sandbox process: PID 1 of each pod's sandbox, which
// holds the pod's namespaces. It waits for SIGTERM or SIGINT and reaps the children that
// the pod's containers leave behind (they are re-parented to it when they share its PID
// namespace). Built static, it is the only file of the bed's pause image.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var status syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &status, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
