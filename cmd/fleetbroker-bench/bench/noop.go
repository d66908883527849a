package bench

import (
	"context"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/fleetbroker/fleetbroker/internal/policy"
)

// noopMethod is a unary method that does nothing, served by every
// credentials-service variant beside the service itself, through the same
// server, interceptors and TLS (at the production level with a policy rule
// and an audit record like any other method): the floor IssueSession and
// ResolveSession are held to.
const noopMethod = "/fleetbroker.bench.v1.Noop/Call"

// noopAction is the policy action a caller of noopMethod needs (the
// bench's caller has it on every tenant).
const noopAction = policy.CredentialsRead

// noopService serves noopMethod.
var noopService = grpc.ServiceDesc{
	ServiceName: "fleetbroker.bench.v1.Noop",
	HandlerType: (*any)(nil),
	Methods: []grpc.MethodDesc{{
		MethodName: "Call",
		Handler: func(srv any, ctx context.Context, dec func(any) error, interceptor grpc.UnaryServerInterceptor) (any, error) {
			in := new(emptypb.Empty)
			if err := dec(in); err != nil {
				return nil, err
			}
			call := func(context.Context, any) (any, error) { return &emptypb.Empty{}, nil }
			if interceptor == nil {
				return call(ctx, in)
			}
			return interceptor(ctx, in, &grpc.UnaryServerInfo{Server: srv, FullMethod: noopMethod}, call)
		},
	}},
}

// registerNoop registers noopService on s.
func registerNoop(s *grpc.Server) { s.RegisterService(&noopService, struct{}{}) }

// callNoop calls noopMethod on conn.
func callNoop(ctx context.Context, conn grpc.ClientConnInterface) error {
	return conn.Invoke(ctx, noopMethod, &emptypb.Empty{}, &emptypb.Empty{})
}
