package gateway

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"google.golang.org/protobuf/proto"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/provider"
	"github.com/fleetbroker/fleetbroker/services/gateway/tokencache"
)

// The purge removes upstream sessions minted from a secret that is no
// longer current — the credential was replaced (rotated) or deleted — from
// the shared cache and logs them out upstream. The cache key binds every
// session to its credential generation and base URL, so such a session is
// unreachable at once whether or not the purge runs; the purge ends it
// upstream and frees its cache entry.
//
// It works with nothing but the gateway's own Redis and its existing link
// to the credentials service, so it holds whatever Redis deployments or key
// prefixes the two services use:
//
//   - each mint records the session in an index in the gateway's Redis, and
//     purges the sessions of the same credential's older generations at
//     once (a rotation, or a delete and re-create, is noticed on the first
//     call with the new secret);
//   - every PurgeInterval one replica asks the credentials service
//     (ListRetiredGenerations) which indexed generations are retired, and
//     purges them (a delete, or a rotation nobody has used yet).
//
// Key layout, beside the token cache's (prefix <redis-prefix>:gw):
//
//	<prefix>:{<tenant>}:held   sorted set: provider\0credential\0generation\0base URL, score = cache expiry (ms)
//	<prefix>:held              sorted set: tenants with indexed sessions, score = latest expiry (ms)
//	<prefix>:purge             lock: the replica running this interval's purge

// heldIndex is the index of cached upstream sessions.
type heldIndex struct {
	client redis.UniversalClient
	prefix string
}

// heldSession is one indexed session. None of it is secret.
type heldSession struct {
	provider, credential, generation, baseURL string
}

func (m heldSession) member() string {
	return m.provider + "\x00" + m.credential + "\x00" + m.generation + "\x00" + m.baseURL
}

func parseHeld(member string) (heldSession, bool) {
	f := strings.SplitN(member, "\x00", 4)
	if len(f) != 4 {
		return heldSession{}, false
	}
	return heldSession{provider: f[0], credential: f[1], generation: f[2], baseURL: f[3]}, true
}

func (h *heldIndex) tenantKey(tenant string) string { return h.prefix + ":{" + tenant + "}:held" }
func (h *heldIndex) tenantsKey() string             { return h.prefix + ":held" }
func (h *heldIndex) lockKey() string                { return h.prefix + ":purge" }

// add records that tenant's session m is cached until expires.
func (h *heldIndex) add(ctx context.Context, tenant string, m heldSession, expires time.Time) error {
	score := float64(expires.UnixMilli())
	if err := h.client.ZAddGT(ctx, h.tenantKey(tenant), redis.Z{Score: score, Member: m.member()}).Err(); err != nil {
		return err
	}
	return h.client.ZAddGT(ctx, h.tenantsKey(), redis.Z{Score: score, Member: tenant}).Err()
}

// sessions returns tenant's indexed sessions whose cache entries may still
// live, dropping those that expired.
func (h *heldIndex) sessions(ctx context.Context, tenant string) ([]heldSession, error) {
	key := h.tenantKey(tenant)
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	if err := h.client.ZRemRangeByScore(ctx, key, "-inf", "("+now).Err(); err != nil {
		return nil, err
	}
	members, err := h.client.ZRange(ctx, key, 0, -1).Result()
	if err != nil {
		return nil, err
	}
	out := make([]heldSession, 0, len(members))
	for _, m := range members {
		if hs, ok := parseHeld(m); ok {
			out = append(out, hs)
		}
	}
	return out, nil
}

// tenants returns the tenants with indexed sessions that may still live.
func (h *heldIndex) tenants(ctx context.Context) ([]string, error) {
	now := strconv.FormatInt(time.Now().UnixMilli(), 10)
	if err := h.client.ZRemRangeByScore(ctx, h.tenantsKey(), "-inf", "("+now).Err(); err != nil {
		return nil, err
	}
	return h.client.ZRange(ctx, h.tenantsKey(), 0, -1).Result()
}

func (h *heldIndex) remove(ctx context.Context, tenant string, m heldSession) error {
	return h.client.ZRem(ctx, h.tenantKey(tenant), m.member()).Err()
}

// afterMint indexes a session just minted for key and purges the sessions
// of the same credential's other generations: the mint proved that key's
// generation is the current one. Failures are logged, not returned: the
// mint succeeded, and the key binding already keeps old sessions unused.
func (s *Service) afterMint(ctx context.Context, p provider.Provider, key tokencache.Key, ttl time.Duration) {
	m := heldSession{provider: p.Info().Name, credential: key.Credential, generation: key.Generation, baseURL: key.BaseURL}
	if err := s.held.add(ctx, key.Tenant, m, time.Now().Add(ttl)); err != nil {
		s.cfg.Logger.WarnContext(ctx, "could not index a cached upstream session", "tenant_id", key.Tenant, "credential_id", key.Credential, "error", err)
	}
	held, err := s.held.sessions(ctx, key.Tenant)
	if err != nil {
		s.cfg.Logger.WarnContext(ctx, "could not read the index of cached upstream sessions", "tenant_id", key.Tenant, "error", err)
		return
	}
	for _, h := range held {
		if h.credential == key.Credential && h.generation != key.Generation {
			s.purgeSession(ctx, key.Tenant, h, "credential replaced")
		}
	}
}

// PurgeRetired asks the credentials service which credential generations
// of the cached upstream sessions are retired (replaced or deleted), and
// purges their sessions: logged out upstream, dropped from the cache. It
// returns how many it purged. The periodic purge calls it on one replica
// every PurgeInterval; it is safe to call on several at once.
func (s *Service) PurgeRetired(ctx context.Context) (int, error) {
	tenants, err := s.held.tenants(ctx)
	if err != nil {
		return 0, fmt.Errorf("purge: list tenants: %w", err)
	}
	var errs []error
	purged := 0
	for _, tenant := range tenants {
		n, err := s.purgeTenant(ctx, tenant)
		purged += n
		if err != nil {
			errs = append(errs, fmt.Errorf("purge tenant %s: %w", tenant, err))
		}
	}
	return purged, errors.Join(errs...)
}

// maxGenerationsPerCheck is ListRetiredGenerations' limit per request.
const maxGenerationsPerCheck = 1000

func (s *Service) purgeTenant(ctx context.Context, tenant string) (int, error) {
	held, err := s.held.sessions(ctx, tenant)
	if err != nil || len(held) == 0 {
		return 0, err
	}
	type gen struct{ credential, generation string }
	var asked []*credentialsv1.CredentialGeneration
	seen := map[gen]bool{}
	for _, h := range held {
		g := gen{h.credential, h.generation}
		if !seen[g] {
			seen[g] = true
			asked = append(asked, &credentialsv1.CredentialGeneration{CredentialId: h.credential, Generation: h.generation})
		}
	}
	retired := map[gen]bool{}
	for start := 0; start < len(asked); start += maxGenerationsPerCheck {
		batch := asked[start:min(start+maxGenerationsPerCheck, len(asked))]
		resp, err := s.cfg.Sessions.ListRetiredGenerations(ctx, &credentialsv1.ListRetiredGenerationsRequest{TenantId: tenant, Generations: batch})
		if err != nil {
			return 0, err
		}
		for _, r := range resp.GetRetired() {
			retired[gen{r.GetCredentialId(), r.GetGeneration()}] = true
		}
	}
	purged := 0
	for _, h := range held {
		if retired[gen{h.credential, h.generation}] {
			s.purgeSession(ctx, tenant, h, "credential deleted or replaced")
			purged++
		}
	}
	return purged, nil
}

// purgeSession logs the cached session h of tenant out upstream (best
// effort), drops it from the cache and from the index.
func (s *Service) purgeSession(ctx context.Context, tenant string, h heldSession, why string) {
	attrs := []any{"provider", h.provider, "tenant_id", tenant, "credential_id", h.credential, "generation", h.generation, "why", why}
	p, ok := s.cfg.Providers.ByName(h.provider)
	if !ok {
		s.cfg.Logger.WarnContext(ctx, "cannot purge a session of a provider this gateway does not serve", attrs...)
		_ = s.held.remove(ctx, tenant, h)
		return
	}
	key := tokencache.Key{Tenant: tenant, Credential: h.credential, Generation: h.generation, BaseURL: h.baseURL, Kind: p.Info().TokenKind}
	entry, found, err := s.cfg.Cache.Get(ctx, key)
	if err != nil {
		s.cfg.Logger.WarnContext(ctx, "purge: could not read a cached upstream session", append(attrs, "error", err)...)
		return
	}
	if found {
		var minted credentialsv1.MintUpstreamSessionResponse
		if proto.Unmarshal([]byte(entry.Token()), &minted) == nil {
			target := provider.Target{Tenant: tenant, Credential: h.credential, Generation: h.generation, BaseURL: h.baseURL}
			lctx, cancel := context.WithTimeout(ctx, logoutTimeout)
			s.logout(lctx, p, &provider.Conn{Target: target, Session: &minted}, why)
			cancel()
		}
		if err := s.cfg.Cache.Invalidate(ctx, entry); err != nil {
			s.cfg.Logger.WarnContext(ctx, "purge: could not drop a cached upstream session", append(attrs, "error", err)...)
			return
		}
	}
	if err := s.held.remove(ctx, tenant, h); err != nil {
		s.cfg.Logger.WarnContext(ctx, "purge: could not update the session index", append(attrs, "error", err)...)
		return
	}
	s.cfg.Logger.InfoContext(ctx, "upstream session purged", append(attrs, slog.Bool("was_cached", found))...)
}

// purgeLoop runs PurgeRetired every PurgeInterval on whichever replica
// takes that interval's lock first, until ctx ends.
func (s *Service) purgeLoop(ctx context.Context) {
	t := time.NewTicker(s.cfg.PurgeInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		// The lock lapses before the next tick, so a replica that dies
		// holding it skips one interval at most.
		ok, err := s.cfg.Redis.SetNX(ctx, s.held.lockKey(), "1", s.cfg.PurgeInterval*9/10).Result()
		if err != nil || !ok {
			continue
		}
		rctx, cancel := context.WithTimeout(ctx, s.cfg.PurgeInterval)
		if n, err := s.PurgeRetired(rctx); err != nil {
			s.cfg.Logger.WarnContext(ctx, "purge of retired upstream sessions failed", "purged", n, "error", err)
		}
		cancel()
	}
}
