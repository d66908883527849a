// Package storetest is the conformance suite for store.Store: every
// implementation, and every backend an implementation runs on, must pass
// Run.
package storetest

import (
	"testing"
	"time"

	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Harness is one empty store under test.
type Harness struct {
	Store store.Store
	// Advance moves time forward by d as the store sees it, so that
	// sessions expire: a real server just sleeps, an in-process one may
	// fast-forward. Nil means time.Sleep.
	Advance func(d time.Duration)
}

func (h Harness) advance(d time.Duration) {
	if h.Advance == nil {
		time.Sleep(d)
		return
	}
	h.Advance(d)
}

// Short session lifetimes for the expiry tests; the whole suite waits for
// shortTTL+expiryMargin at most once per test, and the tests run in parallel.
const (
	shortTTL     = 1500 * time.Millisecond
	expiryMargin = 500 * time.Millisecond
	longTTL      = time.Hour
	callTimeout  = 20 * time.Second
)

// Run runs the suite. newHarness is called once per test, in parallel tests,
// and must return a store that shares no data with any other harness.
func Run(t *testing.T, newHarness func(t *testing.T) Harness) {
	tests := []struct {
		name string
		fn   func(*testing.T, Harness)
	}{
		{"PutGetRoundTrip", testPutGetRoundTrip},
		{"PutReplace", testPutReplace},
		{"GenerationNeverRepeats", testGenerationNeverRepeats},
		{"GetMissing", testGetMissing},
		{"InvalidIDs", testInvalidIDs},
		{"ListPagination", testListPagination},
		{"ListTenantIsolation", testListTenantIsolation},
		{"ListInvalidArguments", testListInvalidArguments},
		{"DeleteCredential", testDeleteCredential},
		{"DeleteCredentialRevokesSessions", testDeleteCredentialRevokesSessions},
		{"CreateSessionMissingCredential", testCreateSessionMissingCredential},
		{"CreateSessionRejectedCredential", testCreateSessionRejectedCredential},
		{"SessionCredential", testSessionCredential},
		{"PutCredentials", testPutCredentials},
		{"PutCredentialsMany", testPutCredentialsMany},
		{"SessionRoundTrip", testSessionRoundTrip},
		{"SessionExpires", testSessionExpires},
		{"SessionNotFound", testSessionNotFound},
		{"DeleteSession", testDeleteSession},
		{"SetValidation", testSetValidation},
		{"UpdateCiphertext", testUpdateCiphertext},
		{"RecordUse", testRecordUse},
		{"ForEachCredential", testForEachCredential},
		{"ForEachCredentialStopsOnError", testForEachCredentialStopsOnError},
		{"ConcurrentPut", testConcurrentPut},
		{"CancelledContext", testCancelledContext},
		{"PutRequestReplays", testPutRequestReplays},
		{"PutExpectedVersion", testPutExpectedVersion},
		{"ConcurrentPutOneRequest", testConcurrentPutOneRequest},
		{"DeleteRequestReplays", testDeleteRequestReplays},
		{"CreateSessionRequestReplays", testCreateSessionRequestReplays},
		{"RequestIDsPerTenantAndOperation", testRequestIDsPerTenantAndOperation},
		{"InvalidRequestID", testInvalidRequestID},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			tt.fn(t, newHarness(t))
		})
	}
}
