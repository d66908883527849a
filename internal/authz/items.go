package authz

import (
	"context"
	"strings"

	"google.golang.org/protobuf/proto"

	"github.com/fleetbroker/fleetbroker/internal/audit"
	"github.com/fleetbroker/fleetbroker/internal/requestid"
)

// batchItems returns the credential ids of a batch request's items, in
// order: a request whose "items" field is a list of messages naming a
// "credential_id" (BatchPutCredentials). The interceptor puts them, and
// their number, in the call's intent record, so the trail says which
// credentials a call was about to write before it writes any.
func batchItems(req any) ([]string, bool) {
	m, ok := req.(proto.Message)
	if !ok {
		return nil, false
	}
	r := m.ProtoReflect()
	fd := r.Descriptor().Fields().ByName("items")
	if fd == nil || !fd.IsList() || fd.Message() == nil {
		return nil, false
	}
	idField := fd.Message().Fields().ByName("credential_id")
	if idField == nil {
		return nil, false
	}
	list := r.Get(fd).List()
	ids := make([]string, list.Len())
	for i := range list.Len() {
		ids[i] = list.Get(i).Message().Get(idField).String()
	}
	return ids, true
}

// ItemOutcome is how one item of a batch call ended: Err nil if it was
// done.
type ItemOutcome struct {
	CredentialID string
	Err          error
}

// RecordItems writes an outcome record for each item of the batch call in
// ctx: the call's principal, method, action, tenant and request id, the
// item's credential id, and its result, code and reason — the record a
// PutCredential of that item would have had. Like a call's outcome, each is
// written before the reply and durable with the next group commit. The
// call's own outcome record then counts the failed items. Outside a call
// the Authorizer let through it records nothing.
func RecordItems(ctx context.Context, items []ItemOutcome) {
	a, call := callFrom(ctx)
	if a == nil {
		return
	}
	failed := 0
	for _, it := range items {
		rec := *call
		rec.Phase = audit.PhaseOutcome
		rec.RequestID = requestid.FromContext(ctx)
		rec.CredentialID, rec.Items, rec.CredentialIDs, rec.ItemsFailed = it.CredentialID, 0, "", 0
		rec.Result, rec.Code, rec.Reason = result(it.Err)
		if it.Err != nil {
			failed++
		}
		if err := a.cfg.Audit.Append(ctx, rec); err != nil {
			a.cfg.Logger.ErrorContext(ctx, "audit outcome of a batch item not written", "error", err, "method", call.Method, "credential_id", it.CredentialID)
		}
	}
	call.ItemsFailed = failed
}

// joinIDs lists credential ids for an audit record: ids never contain a
// comma.
func joinIDs(ids []string) string { return strings.Join(ids, ",") }
