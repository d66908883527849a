// Package requestid gives every inbound call an id that ties its log lines,
// audit events and the caller's own logs together: the caller's
// `x-request-id` metadata if it sent a sane one, else a new random id. The id
// is sent back as `x-request-id`: a response header on success, a trailer on
// failure — so a failed unary call stays a trailers-only response, which is
// what lets gRPC retry policies and mesh proxies retry it (a response with
// headers is committed and never retried).
package requestid

import (
	"context"
	"crypto/rand"
	"encoding/hex"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"
)

// Header is the metadata key of the request id, inbound and outbound.
const Header = "x-request-id"

type ctxKey struct{}

// FromContext returns the call's request id, or "".
func FromContext(ctx context.Context) string {
	id, _ := ctx.Value(ctxKey{}).(string)
	return id
}

// NewContext returns ctx carrying id.
func NewContext(ctx context.Context, id string) context.Context {
	return context.WithValue(ctx, ctxKey{}, id)
}

// fromIncoming takes the caller's id if it is short and printable, so a
// caller cannot inject log structure or unbounded text through it.
func fromIncoming(ctx context.Context) string {
	md, _ := metadata.FromIncomingContext(ctx)
	v := md.Get(Header)
	if len(v) != 1 || len(v[0]) == 0 || len(v[0]) > 64 {
		return newID()
	}
	for _, r := range v[0] {
		if !(r == '-' || r == '_' || r == '.' || r >= '0' && r <= '9' || r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z') {
			return newID()
		}
	}
	return v[0]
}

func newID() string {
	b := make([]byte, 12)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// UnaryServerInterceptor attaches the request id to the call's context and
// returns it in the response header, or in the trailer when the call fails.
func UnaryServerInterceptor() grpc.UnaryServerInterceptor {
	return func(ctx context.Context, req any, _ *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
		id := fromIncoming(ctx)
		resp, err := handler(NewContext(ctx, id), req)
		if err != nil {
			_ = grpc.SetTrailer(ctx, metadata.Pairs(Header, id))
		} else {
			_ = grpc.SetHeader(ctx, metadata.Pairs(Header, id))
		}
		return resp, err
	}
}

// StreamServerInterceptor attaches the request id to the stream's context.
func StreamServerInterceptor() grpc.StreamServerInterceptor {
	return func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
		id := fromIncoming(ss.Context())
		_ = ss.SetHeader(metadata.Pairs(Header, id))
		return handler(srv, &stream{ServerStream: ss, ctx: NewContext(ss.Context(), id)})
	}
}

type stream struct {
	grpc.ServerStream
	ctx context.Context
}

func (s *stream) Context() context.Context { return s.ctx }
