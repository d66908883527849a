package simulator

import (
	"context"
	"encoding/json"
	"time"
)

// The limits Wialon enforces, so that a client that passes against the
// simulator does not get blocked by the real one. Sources are named as in
// wialon.go ("facts: …" quotes /work/shared/reference/upstream-facts.md,
// "Limits (Hosting docs; Wialon Local's recommended values are the
// same)").

// Wialon's documented limits, the defaults of the Config fields below.
const (
	// facts: "per session: at most 10 API requests at once".
	wialonSessionRequests = 10
	// facts: "at most 3 heavy requests at once (message loading, reports,
	// trips)".
	wialonSessionHeavy = 3
	// facts: "per IP address: at most 10 failed logins a minute and 120
	// successful logins a minute; past either, the IP address is blocked
	// (Local: for one minute). At most 100 active sessions of one user from
	// one IP."
	wialonFailedLoginsPerMinute = 10
	wialonLoginsPerMinute       = 120
	wialonSessionsPerUserIP     = 100
	wialonIPBlock               = time.Minute
	// facts: "messages: at most 15 million loaded into a user's sessions".
	wialonLoadedMessages = 15_000_000
)

// Reasons of the 1003 answers. facts: "Past a concurrency limit the reply
// is error 1003 (reasons: "Only one request is allowed at the moment",
// LIMIT api_concurrent, NO_SESSION, LOCKER_ERROR)". Which reason goes with
// which limit, and what a blocked IP is answered, are unverified: the
// simulator answers a blocked IP's logins with 1003 too.
const (
	reasonConcurrent = "LIMIT api_concurrent"
	reasonLayerBusy  = "Only one request is allowed at the moment"
	reasonIPBlocked  = "LIMIT ip blocked: too many logins"
)

// heavyServices are the requests Wialon counts as heavy. facts: "heavy
// requests … (message loading, reports, trips)".
var heavyServices = map[string]bool{
	"messages/load_interval": true,
	"messages/load_last":     true,
	"unit/get_trips":         true,
	"report/exec_report":     true,
}

// layerServices use the session's message layer, and layerReaders run on
// loaded messages (trips, reports): a layer request is refused while
// another layer request or a reader runs in the session, and a reader while
// a layer request runs. facts: "messages/load_interval … loads into the
// session's message layer …; unload it before the next load; it cannot run
// alongside unit/get_trips or reports in the same session". That the
// refused request gets 1003, and that two readers may run together, are
// unverified.
var (
	layerServices = map[string]bool{
		"messages/load_interval": true,
		"messages/load_last":     true,
		"messages/get_messages":  true,
		"messages/unload":        true,
	}
	layerReaders = map[string]bool{
		"unit/get_trips":     true,
		"report/exec_report": true,
	}
)

// limits are the Config's limits with the defaults filled in; a negative
// Config value means no limit.
func (c *Config) fillWialonLimits() {
	fill := func(v *int, def int) {
		switch {
		case *v == 0:
			*v = def
		case *v < 0:
			*v = int(^uint(0) >> 1)
		}
	}
	fill(&c.WialonSessionRequests, wialonSessionRequests)
	fill(&c.WialonSessionHeavy, wialonSessionHeavy)
	fill(&c.WialonFailedLoginsPerMinute, wialonFailedLoginsPerMinute)
	fill(&c.WialonLoginsPerMinute, wialonLoginsPerMinute)
	fill(&c.WialonSessionsPerUserIP, wialonSessionsPerUserIP)
	fill(&c.WialonLoadedMessagesLimit, wialonLoadedMessages)
}

// admit counts a request against its session's limits, or returns the
// reason of the 1003 it must be answered with. A core/batch is one request,
// heavy if any of its calls is, and using the layer as its calls do.
func (s *Simulator) admit(sess *session, svc string, params json.RawMessage) (release func(), refusal string) {
	heavy, usesLayer, reads := heavyServices[svc], layerServices[svc], layerReaders[svc]
	if svc == "core/batch" {
		if calls, _, err := parseBatch(params); err == nil {
			for _, c := range calls {
				heavy = heavy || heavyServices[c.Svc]
				usesLayer = usesLayer || layerServices[c.Svc]
				reads = reads || layerReaders[c.Svc]
			}
		}
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	switch {
	case sess.inflight >= s.cfg.WialonSessionRequests, heavy && sess.heavy >= s.cfg.WialonSessionHeavy:
		s.stats.WialonLimitErrors[reasonConcurrent]++
		return nil, reasonConcurrent
	case usesLayer && (sess.layerBusy || sess.readers > 0), reads && sess.layerBusy:
		s.stats.WialonLimitErrors[reasonLayerBusy]++
		return nil, reasonLayerBusy
	}
	sess.inflight++
	s.stats.WialonPeakRequests = max(s.stats.WialonPeakRequests, sess.inflight)
	if heavy {
		sess.heavy++
		s.stats.WialonPeakHeavy = max(s.stats.WialonPeakHeavy, sess.heavy)
	}
	if usesLayer {
		sess.layerBusy = true
	}
	if reads {
		sess.readers++
	}
	return func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		sess.inflight--
		if heavy {
			sess.heavy--
		}
		if usesLayer {
			sess.layerBusy = false
		}
		if reads {
			sess.readers--
		}
		sess.lastUsed = s.now() // the idle time runs from the end of the last request
	}, ""
}

// ipLogins is one IP address's recent logins.
type ipLogins struct {
	failed, succeeded []time.Time
	blockedUntil      time.Time
}

func (l *ipLogins) prune(now time.Time) {
	keep := func(ts []time.Time) []time.Time {
		i := 0
		for i < len(ts) && now.Sub(ts[i]) >= time.Minute {
			i++
		}
		return ts[i:]
	}
	l.failed, l.succeeded = keep(l.failed), keep(l.succeeded)
}

func (s *Simulator) ipLoginsLocked(ip string, now time.Time) *ipLogins {
	l := s.logins[ip]
	if l == nil {
		l = &ipLogins{}
		s.logins[ip] = l
	}
	l.prune(now)
	return l
}

// loginBlockedLocked returns the refusal of a login from ip while ip is
// blocked.
func (s *Simulator) loginBlockedLocked(ip string, now time.Time) string {
	if now.Before(s.ipLoginsLocked(ip, now).blockedUntil) {
		s.stats.WialonBlockedLogins++
		return reasonIPBlocked
	}
	return ""
}

// countLoginLocked records a login's outcome; the failed login past the
// limit blocks the IP.
func (s *Simulator) countLoginLocked(ip string, succeeded bool, now time.Time) {
	l := s.ipLoginsLocked(ip, now)
	if succeeded {
		l.succeeded = append(l.succeeded, now)
		return
	}
	l.failed = append(l.failed, now)
	if len(l.failed) > s.cfg.WialonFailedLoginsPerMinute {
		s.blockLocked(l, now)
	}
}

// openSessionBlockedLocked checks, before a successful login opens a
// session, the successful logins from ip and the sessions of user from ip,
// and counts the login; past either limit it blocks ip.
func (s *Simulator) openSessionBlockedLocked(ip, user string, now time.Time) string {
	n := 0
	for _, sess := range s.sessions {
		if sess.user == user && sess.ip == ip {
			n++
		}
	}
	l := s.ipLoginsLocked(ip, now)
	if n >= s.cfg.WialonSessionsPerUserIP || len(l.succeeded) >= s.cfg.WialonLoginsPerMinute {
		s.blockLocked(l, now)
		return reasonIPBlocked
	}
	s.countLoginLocked(ip, true, now)
	return ""
}

func (s *Simulator) blockLocked(l *ipLogins, now time.Time) {
	l.blockedUntil = now.Add(wialonIPBlock)
	s.stats.WialonIPBlocks++
	s.stats.WialonBlockedLogins++
}

// delayKey carries a Wialon request's simulated latency from inject to
// serveWialon, which applies it while the request holds its place in the
// session's limits.
type delayKey struct{}

func withDelay(ctx context.Context, d time.Duration) context.Context {
	return context.WithValue(ctx, delayKey{}, d)
}

func delayOf(ctx context.Context) time.Duration {
	d, _ := ctx.Value(delayKey{}).(time.Duration)
	return d
}
