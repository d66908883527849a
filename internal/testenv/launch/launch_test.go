package launch

import (
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// TestStartPlainRedis: the server answers PING on loopback, and after Stop
// it is gone and its directory removed.
func TestStartPlainRedis(t *testing.T) {
	p, err := StartPlainRedis(15 * time.Second)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(p.Addr, "127.0.0.1:") {
		t.Errorf("Addr %q, want loopback", p.Addr)
	}
	if err := RedisPing(p.Addr); err != nil {
		t.Fatalf("PING: %v", err)
	}
	p.Stop()
	p.Stop() // twice is harmless
	select {
	case <-p.Done:
	default:
		t.Error("the server still runs after Stop")
	}
	if _, err := os.Stat(p.Dir); !os.IsNotExist(err) {
		t.Errorf("its directory %s remains: %v", p.Dir, err)
	}
	if err := RedisPing(p.Addr); err == nil {
		t.Error("PING answered after Stop")
	}
}

// TestProc: a child that fails its readiness probe and exits is reported
// with its output; a running one is sampled from /proc and stopped.
func TestProc(t *testing.T) {
	quits, err := StartProc("quitter", exec.Command("sh", "-c", "echo going-away; exit 3"), "")
	if err != nil {
		t.Fatal(err)
	}
	err = quits.WaitReady(10*time.Second, func() error { return os.ErrNotExist })
	if err == nil || !strings.Contains(err.Error(), "exited during startup") || !strings.Contains(err.Error(), "going-away") {
		t.Errorf("WaitReady of an exiting child: %v", err)
	}

	runs, err := StartProc("sleeper", exec.Command("sleep", "60"), t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	st, err := ReadProcStats(runs.Pid())
	if err != nil || st.RSS <= 0 || st.HWM < st.RSS || st.FDs <= 0 || st.Threads <= 0 {
		t.Errorf("ReadProcStats = %+v, %v", st, err)
	}
	runs.Stop()
	if !runs.Exited() {
		t.Error("the child still runs after Stop")
	}
}
