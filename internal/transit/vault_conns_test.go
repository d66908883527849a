package transit_test

import (
	"io"
	"net"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/fleetbroker/fleetbroker/internal/testenv"
	"github.com/fleetbroker/fleetbroker/internal/transit"
)

// countingProxy forwards TCP connections to addr and counts them.
func countingProxy(t *testing.T, addr string) (string, *atomic.Int64) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { lis.Close() })
	var n atomic.Int64
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			n.Add(1)
			go func() {
				defer c.Close()
				up, err := net.Dial("tcp", addr)
				if err != nil {
					return
				}
				defer up.Close()
				go func() { _, _ = io.Copy(up, c) }()
				_, _ = io.Copy(c, up)
			}()
		}
	}()
	return lis.Addr().String(), &n
}

// TestVaultKeepsItsConnections: a burst of concurrent calls, then another,
// reuses the connections of the first: the Vault client keeps enough idle
// connections for the calls that run at once (its library's default keeps
// GOMAXPROCS+1, and dialled a new one for every call past that).
func TestVaultKeepsItsConnections(t *testing.T) {
	srv := testenv.Vault(t)
	u, err := url.Parse(srv.Addr)
	if err != nil {
		t.Fatal(err)
	}
	proxy, conns := countingProxy(t, u.Host)
	u.Host = proxy
	key := srv.NewKeyName(t)
	v := newVault(t, transit.VaultConfig{Addr: u.String(), Token: srv.RootToken, Key: key, CACert: srv.CACert, TLSServerName: "localhost"}, nil)
	if err := v.EnsureKey(t.Context()); err != nil {
		t.Fatal(err)
	}
	burst := func() {
		var wg sync.WaitGroup
		for range 24 {
			wg.Go(func() {
				if _, err := v.HMAC(t.Context(), []byte("x")); err != nil {
					t.Error(err)
				}
			})
		}
		wg.Wait()
	}
	burst()
	before := conns.Load()
	burst()
	// A busy machine may finish some of the first burst's calls before
	// others start, so it can open fewer than 24 connections and the second
	// burst then needs more. What must not happen is the default transport's
	// behaviour: keeping 2 idle connections and opening ~22 again. So the
	// two bursts together may open at most 24 (+2 for timing), not more.
	if total := conns.Load(); total > 24+2 {
		t.Errorf("two bursts of 24 concurrent calls opened %d connections (the first %d); want the first burst's reused", total, before)
	}
}
