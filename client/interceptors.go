package client

import (
	"context"

	"google.golang.org/grpc"
)

// UnaryClientInterceptor replaces a handle the gateway called invalid and
// tries the call once more with a fresh one: an invalid handle means the
// gateway did nothing, so the retry is safe for every method. When no new
// handle can be issued (the credential was deleted or rejected) the source
// stops and the call returns its error, which wraps ErrStopped.
func (s *HandleSource) UnaryClientInterceptor() grpc.UnaryClientInterceptor {
	return func(ctx context.Context, method string, req, reply any, cc *grpc.ClientConn, invoker grpc.UnaryInvoker, opts ...grpc.CallOption) error {
		if err := s.Err(); err != nil {
			return err
		}
		used := s.peek()
		err := invoker(ctx, method, req, reply, cc, opts...)
		if !IsSessionInvalid(err) {
			return s.orStopped(err)
		}
		s.invalidate(used)
		if _, herr := s.Handle(ctx); herr != nil {
			return herr
		}
		return s.orStopped(invoker(ctx, method, req, reply, cc, opts...))
	}
}

// StreamClientInterceptor drops a handle the gateway called invalid when a
// stream fails with it, so the caller's next subscription carries a fresh
// one. Streams are not replayed: the caller re-subscribes.
func (s *HandleSource) StreamClientInterceptor() grpc.StreamClientInterceptor {
	return func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		if err := s.Err(); err != nil {
			return nil, err
		}
		used := s.peek()
		cs, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			if IsSessionInvalid(err) {
				s.invalidate(used)
			}
			return nil, s.orStopped(err)
		}
		return &watchedStream{ClientStream: cs, source: s, handle: used}, nil
	}
}

type watchedStream struct {
	grpc.ClientStream
	source *HandleSource
	handle string
}

func (w *watchedStream) RecvMsg(m any) error {
	err := w.ClientStream.RecvMsg(m)
	if IsSessionInvalid(err) {
		w.source.invalidate(w.handle)
	}
	return err
}

// peek returns the current handle without issuing one ("" if none).
func (s *HandleSource) peek() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.current == nil {
		return ""
	}
	return s.current.handle
}

// orStopped returns the source's stop error in place of err when the source
// has stopped, so callers can test errors.Is(err, ErrStopped).
func (s *HandleSource) orStopped(err error) error {
	if err == nil {
		return nil
	}
	if stop := s.Err(); stop != nil {
		return stop
	}
	return err
}

// DialOptions are what a connection to the gateway needs: the source's
// handle on every call, its interceptors, and ServiceConfig's retry policy.
func (s *HandleSource) DialOptions() []grpc.DialOption {
	return []grpc.DialOption{
		grpc.WithPerRPCCredentials(s),
		grpc.WithChainUnaryInterceptor(s.UnaryClientInterceptor()),
		grpc.WithChainStreamInterceptor(s.StreamClientInterceptor()),
		grpc.WithDefaultServiceConfig(ServiceConfig),
	}
}
