package credentials

import (
	"context"
	"fmt"
	"strconv"

	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/proto"

	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authn"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// errRequestReused answers a request id that came back with another request.
var errRequestReused = apierr.Field("request_id",
	"this request_id was used for a different request within the last "+store.RequestWindow.String()+"; send a new request_id for a new request")

// errNotAtExpectedVersion answers a conditional put that found another version.
func errNotAtExpectedVersion(v int64) error {
	msg := "the credential is not at expected_version " + strconv.FormatInt(v, 10) + "; nothing was stored: read it again"
	if v == 0 {
		msg = "the credential exists (expected_version 0 asks for a new one); nothing was stored"
	}
	return apierr.New(codes.Aborted, apierr.ReasonConcurrentUpdate, msg, map[string]string{"expected_version": strconv.FormatInt(v, 10)})
}

// idempotent is the store.Request of a mutating call (AIP-155): the
// caller's request id, and a keyed hash of who asks for what (the message
// without its request id), so that a retry is recognized and a reuse of the
// id for another request is refused. The hash is keyed because requests
// carry secrets. parts are what the hash covers, for checkReplay.
func (s *Service) idempotent(ctx context.Context, op, requestID string, msg proto.Message) (store.Request, []string, error) {
	if requestID == "" {
		return store.Request{}, nil, nil
	}
	parts, err := requestParts(ctx, op, msg)
	if err != nil {
		return store.Request{}, nil, err
	}
	return store.Request{ID: requestID, Hash: s.cfg.HandleKeys.RequestHash(parts...)}, parts, nil
}

// checkReplay refuses a replayed result whose first request was another.
func (s *Service) checkReplay(r store.Replay, parts []string) error {
	if r.Replayed && !s.cfg.HandleKeys.SameRequest(r.RequestHash, parts...) {
		return errRequestReused
	}
	return nil
}

func requestParts(ctx context.Context, op string, msg proto.Message) ([]string, error) {
	m := proto.Clone(msg)
	if fd := m.ProtoReflect().Descriptor().Fields().ByName("request_id"); fd != nil {
		m.ProtoReflect().Clear(fd)
	}
	b, err := proto.MarshalOptions{Deterministic: true}.Marshal(m)
	if err != nil {
		return nil, fmt.Errorf("hash request: %w", err)
	}
	p, _ := authn.FromContext(ctx)
	return []string{op, p.Via, p.Name, string(b)}, nil
}
