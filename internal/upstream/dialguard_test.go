package upstream

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// errReachedSocket is returned by the base dialer's Control hook in tests: it
// proves the guard let a dial through to the socket, and stops it there, so
// tests of public addresses need no network.
var errReachedSocket = errors.New("test: reached the socket")

// fakeDNS answers lookups from a table and counts them.
type fakeDNS struct {
	mu      sync.Mutex
	answers map[string][]string
	lookups int
}

func (f *fakeDNS) lookup(_ context.Context, _ string, host string) ([]netip.Addr, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.lookups++
	raw, ok := f.answers[host]
	if !ok {
		return nil, &net.DNSError{Err: "no such host", Name: host, IsNotFound: true}
	}
	out := make([]netip.Addr, len(raw))
	for i, s := range raw {
		out[i] = netip.MustParseAddr(s)
	}
	return out, nil
}

// socketRecorder is a base dialer whose Control hook records the addresses
// that reached a socket and then fails the dial with errReachedSocket.
type socketRecorder struct {
	mu    sync.Mutex
	addrs []string
}

func (r *socketRecorder) dialer() *net.Dialer {
	return &net.Dialer{Timeout: 5 * time.Second, Control: func(_, address string, _ syscall.RawConn) error {
		r.mu.Lock()
		defer r.mu.Unlock()
		r.addrs = append(r.addrs, address)
		return errReachedSocket
	}}
}

func (r *socketRecorder) seen() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]string(nil), r.addrs...)
}

func mustList(t *testing.T, s string) *AllowList {
	t.Helper()
	a, err := ParseAllowList(s)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func TestAddressClass(t *testing.T) {
	tests := []struct {
		ip, want string
	}{
		{"0.0.0.0", "unspecified"},
		{"0.1.2.3", "unspecified"},
		{"10.0.0.1", "private"},
		{"10.255.255.255", "private"},
		{"100.64.0.1", "shared (CGNAT)"},
		{"100.127.255.254", "shared (CGNAT)"},
		{"127.0.0.1", "loopback"},
		{"127.1.2.3", "loopback"},
		{"169.254.169.254", "link-local"},
		{"172.16.0.1", "private"},
		{"172.31.255.255", "private"},
		{"192.168.1.1", "private"},
		{"224.0.0.1", "multicast"},
		{"239.255.255.250", "multicast"},
		{"240.0.0.1", "reserved"},
		{"255.255.255.255", "reserved"},
		{"::", "unspecified"},
		{"::1", "loopback"},
		{"fc00::1", "private (ULA)"},
		{"fd12:3456:789a::1", "private (ULA)"},
		{"fe80::1", "link-local"},
		{"fe80::1%eth0", "link-local"},
		{"ff02::1", "multicast"},
		{"::ffff:10.0.0.1", "private"},
		{"::ffff:127.0.0.1", "loopback"},
		{"::ffff:169.254.169.254", "link-local"},
		{"64:ff9b::a00:1", "private"},   // NAT64 of 10.0.0.1
		{"64:ff9b::7f00:1", "loopback"}, // NAT64 of 127.0.0.1
		{"64:ff9b::808:808", ""},        // NAT64 of 8.8.8.8
		{"8.8.8.8", ""},                 // public
		{"100.63.255.255", ""},          // just below CGNAT
		{"100.128.0.0", ""},             // just above CGNAT
		{"172.15.255.255", ""},          // just below 172.16/12
		{"172.32.0.0", ""},              // just above 172.16/12
		{"169.253.255.255", ""},         // just below link-local
		{"223.255.255.255", ""},         // just below multicast
		{"203.0.113.7", ""},             // documentation range, not internal
		{"2001:4860:4860::8888", ""},    // public IPv6
		{"::ffff:8.8.8.8", ""},          // mapped public
		{"fbff:ffff:ffff::1", ""},       // just below fc00::/7
		{"fec0::1", "site-local"},
		{"feff::1", "site-local"},
		{"ff00::", "multicast"},
		{"2a00:1450:4001:80b::200e", ""},   // public IPv6
		{"2001:db8::1", ""},                // documentation IPv6
		{"1.1.1.1", ""},                    // public
		{"198.51.100.1", ""},               // documentation range
		{"9.255.255.255", ""},              // just below 10/8
		{"11.0.0.0", ""},                   // just above 10/8
		{"126.255.255.255", ""},            // just below loopback
		{"128.0.0.0", ""},                  // just above loopback
		{"192.167.255.255", ""},            // just below 192.168/16
		{"192.169.0.0", ""},                // just above 192.168/16
		{"1.0.0.0", ""},                    // just above 0/8
		{"239.255.255.255", "multicast"},   // top of multicast
		{"ffff:ffff:ffff::1", "multicast"}, // top of ff00::/8
	}
	for _, tt := range tests {
		if got := addressClass(netip.MustParseAddr(tt.ip)); got != tt.want {
			t.Errorf("addressClass(%s) = %q, want %q", tt.ip, got, tt.want)
		}
	}
	if got := addressClass(netip.Addr{}); got == "" {
		t.Error("the zero netip.Addr is classed as public")
	}
}

// The heart of the guard: a host allowed by name — the provider defaults, or
// a default listed explicitly — is refused when DNS points it at an internal
// address, before any socket is opened.
func TestDialRefusesInternalAddressesOfAllowedNames(t *testing.T) {
	forbidden := map[string]string{
		"10.1.2.3":           "private",
		"172.20.0.5":         "private",
		"192.168.0.10":       "private",
		"127.0.0.1":          "loopback",
		"127.53.53.53":       "loopback",
		"169.254.169.254":    "link-local",
		"0.0.0.0":            "unspecified",
		"100.64.0.1":         "shared (CGNAT)",
		"224.0.0.251":        "multicast",
		"255.255.255.255":    "reserved",
		"::1":                "loopback",
		"::":                 "unspecified",
		"fe80::1":            "link-local",
		"fd00::1":            "private (ULA)",
		"ff02::1":            "multicast",
		"::ffff:10.0.0.1":    "private",
		"::ffff:127.0.0.1":   "loopback",
		"64:ff9b::a9fe:a9fe": "link-local", // NAT64 of 169.254.169.254
	}
	lists := map[string]*AllowList{
		"nil list":                    nil,
		"default listed explicitly":   mustList(t, "hst-api.wialon.com, api.fleetup.net:443"),
		"other explicit entries only": mustList(t, "wialon.example.com, 127.0.0.1:7480"),
	}
	for listName, list := range lists {
		for ip, class := range forbidden {
			for _, host := range []string{"hst-api.wialon.com", "api.fleetup.net"} {
				t.Run(listName+"/"+host+"/"+ip, func(t *testing.T) {
					dns := &fakeDNS{answers: map[string][]string{host: {ip}}}
					rec := &socketRecorder{}
					dial := list.dialContext(rec.dialer(), dns.lookup)
					conn, err := dial(t.Context(), "tcp", host+":443")
					if err == nil {
						conn.Close()
						t.Fatalf("dial to %s resolving to %s succeeded", host, ip)
					}
					if !errors.Is(err, ErrForbiddenAddress) || !errors.Is(err, ErrNotAllowed) {
						t.Fatalf("error %v does not wrap ErrForbiddenAddress and ErrNotAllowed", err)
					}
					msg := err.Error()
					if !strings.Contains(msg, host) || !strings.Contains(msg, " "+class+" address") {
						t.Errorf("error %q does not name the host %s and the class %q", msg, host, class)
					}
					if strings.Contains(msg, ip) {
						t.Errorf("error %q names the internal address", msg)
					}
					if got := rec.seen(); len(got) != 0 {
						t.Errorf("sockets were opened for %v", got)
					}
				})
			}
		}
	}
}

// A mixed answer is a hostile record: refuse it whole rather than route
// around the internal address.
func TestDialRefusesMixedAnswer(t *testing.T) {
	for _, answer := range [][]string{
		{"203.0.113.7", "10.0.0.1"},
		{"10.0.0.1", "203.0.113.7"},
		{"2001:db8::7", "::1"},
	} {
		dns := &fakeDNS{answers: map[string][]string{"hst-api.wialon.com": answer}}
		rec := &socketRecorder{}
		_, err := (*AllowList)(nil).dialContext(rec.dialer(), dns.lookup)(t.Context(), "tcp", "hst-api.wialon.com:443")
		if !errors.Is(err, ErrForbiddenAddress) {
			t.Errorf("answer %v: error %v, want ErrForbiddenAddress", answer, err)
		}
		if got := rec.seen(); len(got) != 0 {
			t.Errorf("answer %v: sockets were opened for %v", answer, got)
		}
	}
}

// Public addresses go through, to exactly the addresses the one lookup
// returned, in order.
func TestDialAllowsPublicAddresses(t *testing.T) {
	dns := &fakeDNS{answers: map[string][]string{
		"api.fleetup.net":    {"203.0.113.7", "2001:db8::7"},
		"wialon.example.com": {"198.51.100.20"},
	}}
	rec := &socketRecorder{}
	dial := mustList(t, "wialon.example.com").dialContext(rec.dialer(), dns.lookup)

	_, err := dial(t.Context(), "tcp", "api.fleetup.net:443")
	if !errors.Is(err, errReachedSocket) {
		t.Fatalf("dial to a public default: %v, want the test's socket hook to be reached", err)
	}
	_, err = dial(t.Context(), "tcp", "wialon.example.com:8443")
	if !errors.Is(err, errReachedSocket) {
		t.Fatalf("dial to a public listed host: %v, want the test's socket hook to be reached", err)
	}
	_, err = dial(t.Context(), "tcp", "203.0.113.9:443")
	if !errors.Is(err, ErrNotAllowed) {
		t.Fatalf("dial to an unlisted public literal: %v, want ErrNotAllowed", err)
	}
	want := []string{"203.0.113.7:443", "[2001:db8::7]:443", "198.51.100.20:8443"}
	if got := rec.seen(); strings.Join(got, " ") != strings.Join(want, " ") {
		t.Errorf("sockets opened for %v, want %v", got, want)
	}
	if dns.lookups != 2 {
		t.Errorf("%d lookups, want one per dial", dns.lookups)
	}
}

// An entry that names a host explicitly exempts it from the address checks:
// the operator accepts where it resolves. The connections are real, to a
// loopback listener.
func TestDialAllowsExplicitlyListedInternalHosts(t *testing.T) {
	lis, err := net.Listen("tcp4", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	p := strconv.Itoa(lis.Addr().(*net.TCPAddr).Port)

	dns := &fakeDNS{answers: map[string][]string{
		// ::1 first, with nothing listening there: the dial must fall back
		// to 127.0.0.1, as net.Dialer would.
		"localhost":               {"::1", "127.0.0.1"},
		"wialon.internal.example": {"127.0.0.1"},
	}}
	tests := []struct {
		name, list, addr string
	}{
		{"loopback literal with port", "127.0.0.1:" + p, "127.0.0.1:" + p},
		{"loopback literal without port", "127.0.0.1", "127.0.0.1:" + p},
		{"localhost with port", "localhost:" + p, "localhost:" + p},
		{"localhost upper case", "LOCALHOST:" + p, "LocalHost:" + p},
		{"internal name", "wialon.internal.example", "wialon.internal.example:" + p},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The caller's own Control hook must still run for an exempt host.
			var controlled []string
			base := &net.Dialer{Timeout: 5 * time.Second, ControlContext: func(_ context.Context, _, address string, _ syscall.RawConn) error {
				controlled = append(controlled, address)
				return nil
			}}
			conn, err := mustList(t, tt.list).dialContext(base, dns.lookup)(t.Context(), "tcp", tt.addr)
			if err != nil {
				t.Fatalf("dial %s with list %q: %v", tt.addr, tt.list, err)
			}
			defer conn.Close()
			if got := conn.RemoteAddr().String(); got != "127.0.0.1:"+p {
				t.Errorf("connected to %s", got)
			}
			if len(controlled) == 0 {
				t.Error("the base dialer's ControlContext was not called")
			}
		})
	}
}

// Only an explicit entry for that host (and port) exempts it.
func TestDialExemptionIsNarrow(t *testing.T) {
	dns := &fakeDNS{answers: map[string][]string{
		"localhost":          {"127.0.0.1"},
		"wialon.example.com": {"10.0.0.5"},
	}}
	tests := []struct {
		name, list, addr string
		want             error
	}{
		{"other port of a listed host", "localhost:7480", "localhost:7481", ErrNotAllowed},
		{"unlisted loopback literal", "localhost:7480", "127.0.0.1:7480", ErrNotAllowed},
		{"unlisted name", "localhost:7480", "metadata.google.internal:80", ErrNotAllowed},
		{"default host on another port", "", "hst-api.wialon.com:80", ErrNotAllowed},
		{"unlisted name with a private answer", "", "wialon.example.com:443", ErrNotAllowed},
		{"literal private not listed", "10.0.0.6", "10.0.0.5:443", ErrNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := &socketRecorder{}
			_, err := mustList(t, tt.list).dialContext(rec.dialer(), dns.lookup)(t.Context(), "tcp", tt.addr)
			if !errors.Is(err, tt.want) {
				t.Fatalf("dial %s with list %q: %v, want %v", tt.addr, tt.list, err, tt.want)
			}
			if got := rec.seen(); len(got) != 0 {
				t.Errorf("sockets were opened for %v", got)
			}
		})
	}
}

// The Control hook is the last line: it refuses a forbidden socket address
// even if the checks before it had a gap (the dial path checks first, so the
// hook is driven directly here), and passes other addresses on to the
// caller's own hook.
func TestGuardControl(t *testing.T) {
	base := &net.Dialer{Control: func(string, string, syscall.RawConn) error { return errReachedSocket }}
	hook := guardControl(base, "api.fleetup.net", false)
	for _, addr := range []string{"127.0.0.1:443", "[::1]:443", "10.0.0.1:443", "[::ffff:192.168.0.1]:443", "[fe80::1%lo]:443", "169.254.169.254:80", "garbage"} {
		if err := hook(t.Context(), "tcp", addr, nil); !errors.Is(err, ErrForbiddenAddress) {
			t.Errorf("guard(%s) = %v, want ErrForbiddenAddress", addr, err)
		}
	}
	for _, addr := range []string{"203.0.113.7:443", "[2001:db8::7]:443"} {
		if err := hook(t.Context(), "tcp", addr, nil); !errors.Is(err, errReachedSocket) {
			t.Errorf("guard(%s) = %v, want the base hook's error", addr, err)
		}
	}
	if err := guardControl(base, "localhost", true)(t.Context(), "tcp4", "127.0.0.1:443", nil); !errors.Is(err, errReachedSocket) {
		t.Errorf("exempt guard(loopback) = %v, want the base hook's error", err)
	}
	ctxBase := &net.Dialer{ControlContext: func(context.Context, string, string, syscall.RawConn) error { return io.ErrUnexpectedEOF }}
	if err := guardControl(ctxBase, "api.fleetup.net", false)(t.Context(), "tcp4", "203.0.113.7:443", nil); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("guard with base ControlContext = %v, want its error", err)
	}
	if err := guardControl(&net.Dialer{}, "api.fleetup.net", false)(t.Context(), "tcp4", "203.0.113.7:443", nil); err != nil {
		t.Errorf("guard without base hooks = %v", err)
	}
}

// End to end through an http.Client, as the provider clients use it: the
// refusal survives the *url.Error wrapping, and an explicitly listed
// loopback server is reachable.
func TestTransportEndToEnd(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		io.WriteString(w, "ok")
	}))
	defer srv.Close()
	hostport := strings.TrimPrefix(srv.URL, "http://")

	t.Run("explicit loopback entry", func(t *testing.T) {
		c := &http.Client{Transport: NewTransport(mustList(t, hostport))}
		resp, err := c.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if b, _ := io.ReadAll(resp.Body); string(b) != "ok" {
			t.Fatalf("body %q", b)
		}
	})
	t.Run("not listed", func(t *testing.T) {
		c := &http.Client{Transport: NewTransport(nil)}
		_, err := c.Get(srv.URL)
		if !errors.Is(err, ErrNotAllowed) || errors.Is(err, ErrForbiddenAddress) {
			t.Fatalf("GET unlisted loopback: %v, want ErrNotAllowed only", err)
		}
	})
	t.Run("allowed name resolving to loopback", func(t *testing.T) {
		tr := NewTransport(nil)
		dns := &fakeDNS{answers: map[string][]string{"api.fleetup.net": {"127.0.0.1"}}}
		tr.DialContext = (*AllowList)(nil).dialContext(&net.Dialer{}, dns.lookup)
		c := &http.Client{Transport: tr}
		// Plain http to port 443 so that no TLS handshake is needed to
		// reach the dial; the allow-list check at dial time sees port 443.
		_, err := c.Get("http://api.fleetup.net:443/token")
		if !errors.Is(err, ErrForbiddenAddress) {
			t.Fatalf("GET: %v, want ErrForbiddenAddress", err)
		}
		if strings.Contains(err.Error(), "127.0.0.1") {
			t.Errorf("error %q names the address", err)
		}
	})
	t.Run("no proxy", func(t *testing.T) {
		// Through a proxy the guard would vet the proxy's address, not the
		// upstream's.
		if NewTransport(nil).Proxy != nil {
			t.Fatal("transport uses a proxy")
		}
	})
}

// A literal internal address in a base URL is refused by Check unless an
// entry names it: the allow-list already covers it, with no resolution.
func TestCheckRefusesUnlistedInternalLiterals(t *testing.T) {
	list := mustList(t, "127.0.0.1:7480, wialon.example.com")
	for _, u := range []string{
		"http://127.0.0.1",
		"http://127.0.0.1:7481",
		"http://127.0.0.2:7480",
		"http://10.0.0.1",
		"https://192.168.1.1",
		"http://169.254.169.254/latest/meta-data",
		"http://0.0.0.0:7480",
		"http://100.64.0.1",
		"https://[::1]:7480",
		"https://[fd00::1]",
		"https://[fe80::1%25eth0]",
		"http://[::ffff:127.0.0.1]:7480",
		"http://2130706433:7480", // 127.0.0.1 as one decimal number
		"http://127.1:7480",
		"http://localhost:7480",
	} {
		if err := list.Check(u); !errors.Is(err, ErrNotAllowed) {
			t.Errorf("Check(%q) = %v, want ErrNotAllowed", u, err)
		}
	}
	if err := list.Check("http://127.0.0.1:7480"); err != nil {
		t.Errorf("Check of the listed loopback entry: %v", err)
	}
}

func TestPartialDeadline(t *testing.T) {
	now := time.Unix(1000, 0)
	tests := []struct {
		left      time.Duration
		remaining int
		want      time.Duration
	}{
		{10 * time.Second, 1, 10 * time.Second},
		{10 * time.Second, 2, 5 * time.Second},
		{10 * time.Second, 10, 2 * time.Second}, // floor
		{1 * time.Second, 3, 1 * time.Second},   // less than the floor left: all of it
		{-time.Second, 2, -time.Second},
	}
	for _, tt := range tests {
		if got := partialDeadline(now, now.Add(tt.left), tt.remaining).Sub(now); got != tt.want {
			t.Errorf("partialDeadline(left %v, %d) = %v, want %v", tt.left, tt.remaining, got, tt.want)
		}
	}
}

// Concurrent calls to one provider host must reuse connections: Go's
// default of 2 idle connections per host made the gateway reconnect on
// most calls under load.
func TestNewTransportKeepsEnoughIdleConnections(t *testing.T) {
	tr := NewTransport(&AllowList{})
	if tr.MaxIdleConnsPerHost < 64 || tr.MaxIdleConns < tr.MaxIdleConnsPerHost {
		t.Fatalf("idle pool %d per host / %d total: too small for one shared provider host", tr.MaxIdleConnsPerHost, tr.MaxIdleConns)
	}
}
