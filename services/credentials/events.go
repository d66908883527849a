package credentials

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/timestamppb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/keyspace"
	"github.com/fleetbroker/fleetbroker/internal/policy"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Credential events: what happened to a credential, for products that must
// prompt their customer to reconnect. Every replica appends the events of
// the changes it makes to the tenant's Redis stream (<prefix>:{<tenant>}:events,
// in the tenant's Cluster slot) and publishes the tenant id on one channel
// (<prefix>:events:notify); each replica keeps one subscription to that
// channel and wakes its local watchers, which read the stream from their
// own position. A watcher that misses a notification (a Redis failover
// drops pub/sub messages) still reads the stream every PollInterval, and a
// client that reconnects resumes from the last event id it saw. An event
// carries ids, times and provider reasons, never a secret.

// EventType is what happened to a credential.
type EventType string

// Event types.
const (
	EventCreated  EventType = "created"
	EventRotated  EventType = "rotated"
	EventDeleted  EventType = "deleted"
	EventRejected EventType = "rejected"
	EventExpiring EventType = "expiring"
)

// Event is one credential event.
type Event struct {
	// ID is the stream id Redis gave the event ("<ms>-<seq>"), set when
	// read back.
	ID              string
	Type            EventType
	TenantID        string
	CredentialID    string
	Provider        string
	Version         int64
	Time            time.Time
	TokenExpireTime time.Time
	// Message is the provider's reason of a rejection.
	Message string
}

// Defaults of EventsConfig.
const (
	DefaultEventRetention     = 7 * 24 * time.Hour
	DefaultEventMaxLen        = 1000
	DefaultEventPollInterval  = 5 * time.Second
	DefaultExpiryWarning      = 14 * 24 * time.Hour
	DefaultCredentialCheckInt = time.Hour
)

// EventsConfig configures Events.
type EventsConfig struct {
	// Client is the Redis the streams and the notification channel live in.
	Client redis.UniversalClient
	// Prefix starts every key and the channel (default "fb").
	Prefix string
	// MaxLen is about how many events a tenant's stream keeps (default
	// 1000), Retention how long a stream without new events lives (default
	// 7 days): a watcher can resume within those bounds.
	MaxLen    int64
	Retention time.Duration
	// PollInterval is how often a watcher reads its stream without being
	// woken (default 5 s): the bound on delivery when a notification is lost.
	PollInterval time.Duration
	// ExpiryWarning is how long before a token's expiry its credential gets
	// an EXPIRING event (default 14 days); CheckInterval how often the
	// stored credentials are checked for it and counted for the metrics
	// (default 1 h).
	ExpiryWarning time.Duration
	CheckInterval time.Duration
	// Registerer gets the credential metrics (nil: not registered).
	Registerer prometheus.Registerer
	Logger     *slog.Logger
}

// Events publishes credential events and streams them to watchers. Run must
// be running for watchers to be woken at once (else they poll).
type Events struct {
	cfg     EventsConfig
	metrics *healthMetrics

	mu      sync.Mutex
	waiters map[string]map[chan struct{}]struct{} // tenant → wake channels

	subscribed     chan struct{} // closed once Redis confirmed Run's subscription
	subscribedOnce sync.Once
}

// NewEvents checks cfg and returns Events.
func NewEvents(cfg EventsConfig) (*Events, error) {
	if cfg.Client == nil {
		return nil, errors.New("credential events: a Redis client is required")
	}
	cfg.Prefix = keyspace.Prefix(cfg.Prefix)
	if strings.ContainsAny(cfg.Prefix, "{}") {
		return nil, fmt.Errorf("credential events: prefix %q must not contain '{' or '}'", cfg.Prefix)
	}
	if cfg.MaxLen <= 0 {
		cfg.MaxLen = DefaultEventMaxLen
	}
	if cfg.Retention <= 0 {
		cfg.Retention = DefaultEventRetention
	}
	if cfg.PollInterval <= 0 {
		cfg.PollInterval = DefaultEventPollInterval
	}
	if cfg.ExpiryWarning <= 0 {
		cfg.ExpiryWarning = DefaultExpiryWarning
	}
	if cfg.CheckInterval <= 0 {
		cfg.CheckInterval = DefaultCredentialCheckInt
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	m, err := newHealthMetrics(cfg.Registerer)
	if err != nil {
		return nil, err
	}
	return &Events{cfg: cfg, metrics: m, waiters: map[string]map[chan struct{}]struct{}{}, subscribed: make(chan struct{})}, nil
}

func (e *Events) streamKey(tenantID string) string {
	return e.cfg.Prefix + ":{" + tenantID + "}:events"
}

func (e *Events) channel() string { return e.cfg.Prefix + ":events:notify" }

// Publish appends ev to its tenant's stream and wakes the tenant's watchers
// on every replica.
func (e *Events) Publish(ctx context.Context, ev Event) error {
	return e.PublishAll(ctx, []Event{ev})
}

// PublishAll publishes evs, in order: each is appended to its tenant's
// stream, each stream's retention is renewed, and each tenant's watchers
// on every replica are woken once. It takes one Redis round trip however
// many events (two on a Cluster, where the notification must not overtake
// the appends, which run on other nodes). An event that could not be
// appended is reported in the error; the others are published.
func (e *Events) PublishAll(ctx context.Context, evs []Event) error {
	if len(evs) == 0 {
		return nil
	}
	pipe := e.cfg.Client.Pipeline()
	adds := make([]*redis.StringCmd, len(evs))
	var tenants []string
	for i, ev := range evs {
		adds[i] = pipe.XAdd(ctx, &redis.XAddArgs{Stream: e.streamKey(ev.TenantID), MaxLen: e.cfg.MaxLen, Approx: true, Values: ev.fields()})
		if !slices.Contains(tenants, ev.TenantID) {
			tenants = append(tenants, ev.TenantID)
		}
	}
	expires := make([]*redis.BoolCmd, len(tenants))
	for i, tenant := range tenants {
		// A stream nobody writes to for Retention goes away with its tenant.
		expires[i] = pipe.Expire(ctx, e.streamKey(tenant), e.cfg.Retention)
	}
	notify := pipe
	if _, cluster := e.cfg.Client.(*redis.ClusterClient); cluster {
		_, _ = pipe.Exec(ctx) // errors are read per command below
		notify = e.cfg.Client.Pipeline()
	}
	pubs := make([]*redis.IntCmd, len(tenants))
	for i, tenant := range tenants {
		pubs[i] = notify.Publish(ctx, e.channel(), tenant)
	}
	_, _ = notify.Exec(ctx)
	var errs []error
	for i, c := range adds {
		if err := c.Err(); err != nil {
			ev := evs[i]
			errs = append(errs, fmt.Errorf("publish %s event of %s/%s: %w", ev.Type, ev.TenantID, ev.CredentialID, err))
			continue
		}
		e.metrics.events.WithLabelValues(string(evs[i].Type)).Inc()
	}
	for i, tenant := range tenants {
		if err := expires[i].Err(); err != nil {
			e.cfg.Logger.WarnContext(ctx, "credential event stream retention not set", "tenant_id", tenant, "error", err)
		}
		if err := pubs[i].Err(); err != nil {
			// Watchers still find the events at their next poll.
			e.cfg.Logger.WarnContext(ctx, "credential event notification not sent", "tenant_id", tenant, "error", err)
		}
	}
	return errors.Join(errs...)
}

// Run keeps the replica's one subscription to the notification channel and
// wakes local watchers until ctx ends. go-redis resubscribes after a
// connection loss.
func (e *Events) Run(ctx context.Context) error {
	ps := e.cfg.Client.Subscribe(ctx, e.channel())
	defer ps.Close()
	ch := ps.ChannelWithSubscriptions()
	for {
		select {
		case <-ctx.Done():
			return nil
		case msg, ok := <-ch:
			if !ok {
				return nil
			}
			switch m := msg.(type) {
			case *redis.Subscription:
				if m.Kind == "subscribe" {
					e.subscribedOnce.Do(func() { close(e.subscribed) })
				}
			case *redis.Message:
				e.wake(m.Payload)
			}
		}
	}
}

// Subscribed waits until Redis has confirmed Run's subscription, after
// which no notification is missed (tests start watching after it).
func (e *Events) Subscribed(ctx context.Context) error {
	select {
	case <-e.subscribed:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (e *Events) wake(tenantID string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	for ch := range e.waiters[tenantID] {
		select {
		case ch <- struct{}{}:
		default: // already woken
		}
	}
}

func (e *Events) register(tenantID string) chan struct{} {
	ch := make(chan struct{}, 1)
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.waiters[tenantID] == nil {
		e.waiters[tenantID] = map[chan struct{}]struct{}{}
	}
	e.waiters[tenantID][ch] = struct{}{}
	return ch
}

func (e *Events) unregister(tenantID string, ch chan struct{}) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.waiters[tenantID], ch)
	if len(e.waiters[tenantID]) == 0 {
		delete(e.waiters, tenantID)
	}
}

// Watch calls send with every event of tenantID after afterID ("" means
// from now on), in order, until ctx ends (nil) or send or Redis fails. ready,
// if not nil, is called once the watcher's position is fixed: an event
// published after ready returns reaches send.
func (e *Events) Watch(ctx context.Context, tenantID, afterID string, ready func(), send func(Event) error) error {
	wake := e.register(tenantID)
	defer e.unregister(tenantID, wake)
	key := e.streamKey(tenantID)
	cursor := afterID
	if cursor == "" {
		last, err := e.cfg.Client.XRevRangeN(ctx, key, "+", "-", 1).Result()
		if err != nil {
			return fmt.Errorf("watch credential events: %w", err)
		}
		cursor = "0-0"
		if len(last) > 0 {
			cursor = last[0].ID
		}
	}
	if ready != nil {
		ready()
	}
	poll := time.NewTicker(e.cfg.PollInterval)
	defer poll.Stop()
	for {
		next, err := e.drain(ctx, key, cursor, send)
		if err != nil {
			return err
		}
		cursor = next
		select {
		case <-ctx.Done():
			return nil
		case <-wake:
		case <-poll.C:
		}
	}
}

// drain sends every event after cursor and returns the new cursor.
func (e *Events) drain(ctx context.Context, key, cursor string, send func(Event) error) (string, error) {
	for {
		res, err := e.cfg.Client.XRead(ctx, &redis.XReadArgs{Streams: []string{key, cursor}, Count: 100, Block: -1}).Result()
		if errors.Is(err, redis.Nil) {
			return cursor, nil
		}
		if err != nil {
			if ctx.Err() != nil {
				return cursor, nil
			}
			return cursor, fmt.Errorf("watch credential events: %w", err)
		}
		var n int
		for _, st := range res {
			for _, msg := range st.Messages {
				n++
				cursor = msg.ID
				if err := send(eventFromMessage(msg)); err != nil {
					return cursor, err
				}
			}
		}
		if n < 100 {
			return cursor, nil
		}
	}
}

// fields is ev as stream entry fields; empty ones are left out.
func (ev Event) fields() []any {
	out := []any{"type", string(ev.Type), "tenant_id", ev.TenantID, "credential_id", ev.CredentialID, "time", formatEventTime(ev.Time)}
	if ev.Provider != "" {
		out = append(out, "provider", ev.Provider)
	}
	if ev.Version != 0 {
		out = append(out, "version", strconv.FormatInt(ev.Version, 10))
	}
	if !ev.TokenExpireTime.IsZero() {
		out = append(out, "token_expire_time", formatEventTime(ev.TokenExpireTime))
	}
	if ev.Message != "" {
		out = append(out, "message", ev.Message)
	}
	return out
}

func formatEventTime(t time.Time) string { return t.UTC().Format(time.RFC3339Nano) }

func eventFromMessage(msg redis.XMessage) Event {
	str := func(k string) string { s, _ := msg.Values[k].(string); return s }
	ev := Event{
		ID: msg.ID, Type: EventType(str("type")), TenantID: str("tenant_id"), CredentialID: str("credential_id"),
		Provider: str("provider"), Message: str("message"),
	}
	ev.Version, _ = strconv.ParseInt(str("version"), 10, 64)
	ev.Time, _ = time.Parse(time.RFC3339Nano, str("time"))
	ev.TokenExpireTime, _ = time.Parse(time.RFC3339Nano, str("token_expire_time"))
	return ev
}

func (s *Service) eventToProto(ev Event) *credentialsv1.CredentialEvent {
	out := &credentialsv1.CredentialEvent{
		EventId: ev.ID, Type: eventTypeToProto(ev.Type), TenantId: ev.TenantID, CredentialId: ev.CredentialID,
		Provider: s.providerID(ev.Provider), Version: ev.Version, Message: ev.Message,
	}
	if !ev.Time.IsZero() {
		out.EventTime = timestamppb.New(ev.Time)
	}
	if !ev.TokenExpireTime.IsZero() {
		out.TokenExpireTime = timestamppb.New(ev.TokenExpireTime)
	}
	return out
}

func eventTypeToProto(t EventType) credentialsv1.CredentialEventType {
	switch t {
	case EventCreated:
		return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_CREATED
	case EventRotated:
		return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_ROTATED
	case EventDeleted:
		return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_DELETED
	case EventRejected:
		return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_REJECTED
	case EventExpiring:
		return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_EXPIRING
	}
	return credentialsv1.CredentialEventType_CREDENTIAL_EVENT_TYPE_UNSPECIFIED
}

// --- the service side ---

// emit publishes ev if events are configured. The change it describes has
// already happened, so a failure is logged, not returned.
func (s *Service) emit(ctx context.Context, ev Event) {
	if s.cfg.Events == nil {
		return
	}
	if ev.Time.IsZero() {
		ev.Time = s.cfg.Now()
	}
	if err := s.cfg.Events.Publish(context.WithoutCancel(ctx), ev); err != nil {
		s.cfg.Logger.WarnContext(ctx, "credential event not published", "type", string(ev.Type), "tenant_id", ev.TenantID, "credential_id", ev.CredentialID, "error", err)
	}
}

// emitStored announces a Put: CREATED or ROTATED, and EXPIRING at once for
// a token that already expires within the warning window.
func (s *Service) emitStored(ctx context.Context, rec store.Credential, created bool) {
	s.emit(ctx, storedEvent(rec, created))
	s.warnIfExpiring(ctx, rec)
}

// storedEvent announces a Put: CREATED or ROTATED.
func storedEvent(rec store.Credential, created bool) Event {
	if created {
		return eventOf(EventCreated, rec)
	}
	return eventOf(EventRotated, rec)
}

// emitRejected announces that the provider rejected rec's secret, once:
// only when rec was not already known to be rejected.
func (s *Service) emitRejected(ctx context.Context, rec store.Credential, message string) {
	if rec.ValidationState == store.ValidationRejected {
		return
	}
	ev := eventOf(EventRejected, rec)
	ev.Message = message
	s.emit(ctx, ev)
}

// emitDeleted announces a deletion.
func (s *Service) emitDeleted(ctx context.Context, tenantID, credentialID string) {
	s.emit(ctx, Event{Type: EventDeleted, TenantID: tenantID, CredentialID: credentialID})
}

func eventOf(typ EventType, rec store.Credential) Event {
	return Event{Type: typ, TenantID: rec.TenantID, CredentialID: rec.CredentialID, Provider: rec.Provider,
		Version: rec.Version, TokenExpireTime: rec.TokenExpireTime}
}

// WatchCredentialEvents streams a tenant's credential events.
func (c *credentialServer) WatchCredentialEvents(req *credentialsv1.WatchCredentialEventsRequest, stream credentialsv1.CredentialService_WatchCredentialEventsServer) error {
	s := c.s
	ctx := stream.Context()
	// A stream's tenant is known only now: the interceptor checked the
	// action on some tenant, this checks it on the one asked for.
	if err := s.cfg.Authorizer.Require(ctx, policy.CredentialsRead, req.GetTenantId()); err != nil {
		return err
	}
	if s.cfg.Events == nil {
		return apierr.New(codes.FailedPrecondition, ReasonEventsNotConfigured, "credential events are not configured on this server", nil)
	}
	ready := func() { _ = stream.SendHeader(nil) } // tells the client the watch is in place
	err := s.cfg.Events.Watch(ctx, req.GetTenantId(), req.GetAfterEventId(), ready, func(ev Event) error {
		return stream.Send(&credentialsv1.WatchCredentialEventsResponse{Event: s.eventToProto(ev)})
	})
	if err != nil && ctx.Err() == nil {
		s.cfg.Logger.WarnContext(ctx, "credential event watch ended", "tenant_id", req.GetTenantId(), "error", err)
		return apierr.Retryable(codes.Unavailable, apierr.ReasonStoreUnavailable, "credential events unavailable; resume with after_event_id", time.Second)
	}
	return nil
}

// ReasonEventsNotConfigured: WatchCredentialEvents on a server without events.
const ReasonEventsNotConfigured = "EVENTS_NOT_CONFIGURED"
