package bench

import (
	"bufio"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Environment variables that point the bench at its binaries.
const (
	RedisBinEnv = "FLEETBROKER_REDIS_BIN"
	VaultBinEnv = "FLEETBROKER_VAULT_BIN"
)

// proc is a child process that dies with the bench: Pdeathsig kills it if
// the bench is killed, and stop kills it on a normal exit.
type proc struct {
	name string
	cmd  *exec.Cmd
	log  *tail
	done chan struct{}
	once sync.Once
	dir  string // removed after the process is gone
}

// startProc forks cmd from a goroutine locked to its OS thread until the
// child exits: Pdeathsig fires when the forking thread ends, and the Go
// runtime may retire an unlocked thread at any time.
func startProc(name string, cmd *exec.Cmd, dir string) (*proc, error) {
	p := &proc{name: name, cmd: cmd, log: &tail{max: 8 << 10}, done: make(chan struct{}), dir: dir}
	cmd.Stdout, cmd.Stderr = p.log, p.log
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	started := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread ends with the child
		if err := cmd.Start(); err != nil {
			started <- err
			close(p.done)
			return
		}
		started <- nil
		_ = cmd.Wait()
		close(p.done)
	}()
	if err := <-started; err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return p, nil
}

// stop kills the process, waits for it and removes its directory.
func (p *proc) stop() {
	p.once.Do(func() {
		if p.cmd.Process != nil {
			_ = p.cmd.Process.Kill()
		}
		select {
		case <-p.done:
		case <-time.After(5 * time.Second):
		}
		if p.dir != "" {
			_ = os.RemoveAll(p.dir)
		}
	})
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// pid is the child's process id.
func (p *proc) pid() int { return p.cmd.Process.Pid }

// waitReady polls probe every 50 ms until it succeeds, the child exits or
// timeout passes.
func (p *proc) waitReady(timeout time.Duration, probe func() error) error {
	deadline := time.Now().Add(timeout)
	for {
		err := probe()
		if err == nil {
			return nil
		}
		if p.exited() {
			return fmt.Errorf("%s exited during startup; its output:\n%s", p.name, p.log)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not ready after %s: %v; its output:\n%s", p.name, timeout, err, p.log)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// tail keeps the last max bytes written to it, for error messages.
type tail struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tail) Write(b []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, b...)
	if len(t.buf) > t.max {
		t.buf = t.buf[len(t.buf)-t.max:]
	}
	return len(b), nil
}

func (t *tail) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(t.buf)
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, fmt.Errorf("find a free port: %w", err)
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

// Redis is a redis-server child on loopback.
type Redis struct {
	Addr string
	p    *proc
}

// Stop kills the server.
func (r *Redis) Stop() { r.p.stop() }

// StartRedis runs redis-server ($FLEETBROKER_REDIS_BIN or PATH) on a free
// loopback port without persistence and waits until it answers PING. A
// lost race for the port is retried on a new one.
func StartRedis() (*Redis, error) {
	bin := os.Getenv(RedisBinEnv)
	if bin == "" {
		bin = "redis-server"
	}
	path, err := exec.LookPath(bin)
	if err != nil {
		return nil, fmt.Errorf("redis-server not found (%s or PATH): %w; install it with: apt-get install -y redis-server", RedisBinEnv, err)
	}
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		dir, err := os.MkdirTemp("", "fleetbroker-bench-redis-")
		if err != nil {
			return nil, err
		}
		cmd := exec.Command(path, "--port", strconv.Itoa(port), "--bind", "127.0.0.1",
			"--save", "", "--appendonly", "no", "--dir", dir, "--loglevel", "warning")
		p, err := startProc("redis-server", cmd, dir)
		if err != nil {
			_ = os.RemoveAll(dir)
			return nil, err
		}
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		if lastErr = p.waitReady(15*time.Second, func() error { return redisPing(addr) }); lastErr == nil {
			return &Redis{Addr: addr, p: p}, nil
		}
		p.stop()
	}
	return nil, lastErr
}

// redisPing speaks raw RESP, so a server still starting is not logged
// about by a client pool.
func redisPing(addr string) error {
	conn, err := net.DialTimeout("tcp", addr, time.Second)
	if err != nil {
		return err
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(time.Second))
	if _, err := io.WriteString(conn, "*1\r\n$4\r\nPING\r\n"); err != nil {
		return err
	}
	line, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return err
	}
	if !strings.HasPrefix(line, "+PONG") {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// Vault is a `vault server -dev` child on loopback with transit mounted.
type Vault struct {
	Addr  string // http://127.0.0.1:port
	Token string
	p     *proc
}

// Stop kills the server.
func (v *Vault) Stop() { v.p.stop() }

// FindVault returns the vault binary: $FLEETBROKER_VAULT_BIN, then PATH,
// then where `make tools` installs it.
func FindVault() (string, error) {
	if bin := os.Getenv(VaultBinEnv); bin != "" {
		if _, err := os.Stat(bin); err != nil {
			return "", fmt.Errorf("%s=%s: %w", VaultBinEnv, bin, err)
		}
		return bin, nil
	}
	if bin, err := exec.LookPath("vault"); err == nil {
		return bin, nil
	}
	tried := "~/.cache/fleetbroker/tools/bin/vault"
	if home, err := os.UserHomeDir(); err == nil {
		tried = filepath.Join(home, ".cache", "fleetbroker", "tools", "bin", "vault")
		if _, err := os.Stat(tried); err == nil {
			return tried, nil
		}
	}
	return "", fmt.Errorf("no vault binary: set %s, put vault on PATH, or run `make tools` (builds Vault 1.21 into %s); "+
		"or pass -no-vault to use the dev keyring (no Vault figures)", VaultBinEnv, tried)
}

// StartVault runs a Vault dev server (in-memory storage) on a free
// loopback port, waits for sys/health and mounts transit.
func StartVault(bin string) (*Vault, error) {
	token := "root-" + randomHex(16)
	var lastErr error
	for range 3 {
		port, err := freePort()
		if err != nil {
			return nil, err
		}
		hostPort := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		cmd := exec.Command(bin, "server", "-dev", "-dev-root-token-id="+token,
			"-dev-listen-address="+hostPort, "-dev-no-store-token")
		// A developer's VAULT_* settings must not change how the server starts.
		for _, kv := range os.Environ() {
			if !strings.HasPrefix(kv, "VAULT_") {
				cmd.Env = append(cmd.Env, kv)
			}
		}
		p, err := startProc("vault", cmd, "")
		if err != nil {
			return nil, err
		}
		v := &Vault{Addr: "http://" + hostPort, Token: token, p: p}
		hc := &http.Client{Timeout: time.Second}
		lastErr = p.waitReady(60*time.Second, func() error {
			resp, err := hc.Get(v.Addr + "/v1/sys/health")
			if err != nil {
				return err
			}
			resp.Body.Close()
			if resp.StatusCode != http.StatusOK {
				return fmt.Errorf("sys/health: %s", resp.Status)
			}
			return nil
		})
		if lastErr == nil {
			if lastErr = v.request(http.MethodPost, "sys/mounts/transit", `{"type":"transit"}`); lastErr == nil {
				return v, nil
			}
		}
		p.stop()
	}
	return nil, lastErr
}

func (v *Vault) request(method, path, body string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, method, v.Addr+"/v1/"+path, strings.NewReader(body))
	if err != nil {
		return err
	}
	req.Header.Set("X-Vault-Token", v.Token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	if resp.StatusCode >= 300 {
		msg, _ := io.ReadAll(io.LimitReader(resp.Body, 4096))
		return fmt.Errorf("vault %s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(msg)))
	}
	return nil
}

func randomHex(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// readRSS reads VmRSS and VmHWM (bytes) of a process from /proc.
func readRSS(pid int) (rss, hwm int64, err error) {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		name, value, ok := strings.Cut(sc.Text(), ":")
		if !ok || (name != "VmRSS" && name != "VmHWM") {
			continue
		}
		fields := strings.Fields(value) // "12345 kB"
		if len(fields) != 2 || fields[1] != "kB" {
			return 0, 0, fmt.Errorf("unexpected %s line %q", name, sc.Text())
		}
		kb, err := strconv.ParseInt(fields[0], 10, 64)
		if err != nil {
			return 0, 0, err
		}
		if name == "VmRSS" {
			rss = kb << 10
		} else {
			hwm = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		return 0, 0, err
	}
	if rss == 0 {
		return 0, 0, errors.New("no VmRSS in /proc status")
	}
	return rss, hwm, nil
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
