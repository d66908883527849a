package bench

import (
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/fleetbroker/fleetbroker/internal/testenv/launch"
)

// Environment variables that point the bench at its binaries.
const (
	RedisBinEnv = launch.RedisBinEnv
	VaultBinEnv = launch.VaultBinEnv
)

// proc is a child process that dies with the bench (launch.Proc: the
// starter the tests use too).
type proc = launch.Proc

// startProc starts cmd as a child that dies with the bench; dir, if set, is
// removed once it is stopped.
func startProc(name string, cmd *exec.Cmd, dir string) (*proc, error) {
	return launch.StartProc(name, cmd, dir)
}

// freePort is a free loopback port.
func freePort() (int, error) {
	ports, err := launch.FreePorts(1)
	if err != nil {
		return 0, err
	}
	return ports[0], nil
}

// Redis is a redis-server child on loopback.
type Redis struct {
	Addr string
	p    *launch.RedisProc
}

// Stop kills the server.
func (r *Redis) Stop() { r.p.Stop() }

// pid is the server's process id.
func (r *Redis) pid() int { return r.p.Cmd.Process.Pid }

// StartRedis runs redis-server ($FLEETBROKER_REDIS_BIN or PATH) on a free
// loopback port without persistence and waits until it answers PING, as
// the tests start theirs (internal/testenv/launch).
func StartRedis() (*Redis, error) {
	p, err := launch.StartPlainRedis(15 * time.Second)
	if err != nil {
		return nil, err
	}
	return &Redis{Addr: p.Addr, p: p}, nil
}

// Vault is a `vault server -dev` child on loopback with transit mounted.
type Vault struct {
	Addr  string // http://127.0.0.1:port
	Token string
	p     *launch.VaultDev
}

// Stop kills the server.
func (v *Vault) Stop() { v.p.Stop() }

// pid is the server's process id.
func (v *Vault) pid() int { return v.p.Cmd.Process.Pid }

// FindVault returns the vault binary: $FLEETBROKER_VAULT_BIN, then PATH,
// then where `make tools` installs it.
func FindVault() (string, error) {
	bin, err := launch.VaultBinary()
	if err != nil {
		return "", fmt.Errorf("%w; or pass -no-vault to use the dev keyring (no Vault figures)", err)
	}
	return bin, nil
}

// StartVault runs a Vault dev server (in-memory storage) on a free loopback
// port with transit mounted, as the tests start theirs.
func StartVault(bin string) (*Vault, error) {
	log := &launch.Tail{Max: 8 << 10}
	var lastErr error
	for range 3 { // the free port may be taken before Vault binds it
		p, err := launch.StartVaultDev(bin, log, "")
		if err == nil {
			return &Vault{Addr: p.Addr, Token: p.RootToken, p: p}, nil
		}
		lastErr = err
	}
	return nil, fmt.Errorf("%w; its output:\n%s", lastErr, log)
}

func randomHex(n int) string { return launch.RandomHex(n) }

// readRSS reads VmRSS and VmHWM (bytes) of a process from /proc.
func readRSS(pid int) (rss, hwm int64, err error) {
	st, err := launch.ReadProcStats(pid)
	return st.RSS, st.HWM, err
}

// selfCPU is the CPU time (user + system) this process has used.
func selfCPU() time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		return 0
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat times (100 on Linux).
const clockTicks = 100

// procCPU is the CPU time (user + system) process pid has used, from
// /proc/<pid>/stat, with a resolution of 10 ms.
func procCPU(pid int) time.Duration {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// The command name (field 2) may hold spaces; fields after its ')' are
	// state (3), ... utime (14), stime (15).
	s := string(b)
	fields := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(fields) < 13 {
		return 0
	}
	utime, err1 := strconv.ParseInt(fields[11], 10, 64)
	stime, err2 := strconv.ParseInt(fields[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0
	}
	return time.Duration(utime+stime) * time.Second / clockTicks
}
