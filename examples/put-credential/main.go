// Command put-credential is an operator tool: it stores a customer's Wialon
// token in fleetbroker and issues a session handle for it, the two calls
// that onboard a credential.
//
// The token is read from the environment, never from a flag (flags show in
// `ps` and shell history). Against `fleetbroker dev`:
//
//	FLEETBROKER_WIALON_TOKEN=$(printf 'a%.0s' {1..72}) go run ./examples/put-credential -skip-validation
//
// It prints the credential's metadata and the new session's id and expiry;
// the handle itself only with -show-handle.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/fleetbroker/fleetbroker/client"
	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
)

// tokenEnv names the variable holding the Wialon token.
const tokenEnv = "FLEETBROKER_WIALON_TOKEN"

type config struct {
	addr               string
	tenant, credential string
	baseURL            string
	token              string
	skipValidation     bool
	ttl                time.Duration
	showHandle         bool
}

func main() {
	var cfg config
	flag.StringVar(&cfg.addr, "addr", "localhost:7400", "credentials service address")
	flag.StringVar(&cfg.tenant, "tenant", "acme", "tenant id")
	flag.StringVar(&cfg.credential, "credential", "wialon-main", "credential id")
	flag.StringVar(&cfg.baseURL, "base-url", "http://localhost:7480", "the Wialon the token belongs to (dev: the simulator; empty: hosted Wialon)")
	flag.BoolVar(&cfg.skipValidation, "skip-validation", false, "store without asking Wialon")
	flag.DurationVar(&cfg.ttl, "ttl", 10*time.Minute, "session lifetime")
	flag.BoolVar(&cfg.showHandle, "show-handle", false, "print the session handle (a bearer secret)")
	flag.Parse()
	cfg.token = os.Getenv(tokenEnv)
	if err := run(context.Background(), cfg, os.Stdout); err != nil {
		fmt.Fprintln(os.Stderr, "put-credential:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, cfg config, out io.Writer) error {
	if cfg.token == "" {
		return errors.New(tokenEnv + " is empty: put the 72-character Wialon token there")
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	// Plaintext is for `fleetbroker dev` only; in production use TLS with
	// the operator's client certificate (mTLS) or an x-api-key.
	conn, err := grpc.NewClient(cfg.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()

	put, err := credentialsv1.NewCredentialServiceClient(conn).PutCredential(ctx, &credentialsv1.PutCredentialRequest{
		TenantId: cfg.tenant, CredentialId: cfg.credential, SkipValidation: cfg.skipValidation,
		Secret: &credentialsv1.PutCredentialRequest_Wialon{Wialon: &credentialsv1.WialonSecret{Token: cfg.token, BaseUrl: cfg.baseURL}},
	})
	if err != nil {
		if client.IsCredentialRejected(err) {
			return fmt.Errorf("Wialon rejected the token (was it copied whole?): %w", err)
		}
		return fmt.Errorf("put credential: %w", err)
	}
	c := put.GetCredential()
	fmt.Fprintf(out, "credential %s/%s version %d (created %v) validation %s fingerprint %s\n",
		c.GetTenantId(), c.GetCredentialId(), c.GetVersion(), put.GetCreated(), c.GetValidationState(), c.GetFingerprint())

	sess, err := credentialsv1.NewSessionServiceClient(conn).IssueSession(ctx, &credentialsv1.IssueSessionRequest{
		TenantId: cfg.tenant, CredentialId: cfg.credential, Ttl: durationpb.New(cfg.ttl),
	})
	if err != nil {
		return fmt.Errorf("issue session: %w", err)
	}
	fmt.Fprintf(out, "session %s expires %s\n", sess.GetSessionId(), sess.GetExpireTime().AsTime().Format(time.RFC3339))
	if cfg.showHandle {
		fmt.Fprintf(out, "handle %s\n", sess.GetHandle())
	}
	return nil
}
