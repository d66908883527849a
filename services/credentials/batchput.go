package credentials

import (
	"context"
	"errors"
	"fmt"
	"strconv"

	"golang.org/x/sync/errgroup"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/durationpb"

	credentialsv1 "github.com/fleetbroker/fleetbroker/gen/go/fleetbroker/credentials/v1"
	"github.com/fleetbroker/fleetbroker/internal/apierr"
	"github.com/fleetbroker/fleetbroker/internal/authz"
	"github.com/fleetbroker/fleetbroker/internal/transit"
	"github.com/fleetbroker/fleetbroker/services/credentials/store"
)

// Shape of a BatchPutCredentials call's work.
const (
	// batchValidators is how many of a batch's secrets are validated at
	// once; the provider's login limits (Wialon's login guard) pace them
	// further.
	batchValidators = 8
	// sealChunk is the most items one transit call of a batch carries, and
	// sealCalls how many such calls (encrypt and HMAC together) are under
	// way at once: Vault works on a batch_input in one request, so a big
	// batch split into a few calls keeps its cores busy.
	sealChunk = 100
	sealCalls = 4
)

// batchItem is one item of a BatchPutCredentials call on its way through.
type batchItem struct {
	index int
	put   *credentialsv1.PutCredentialRequest // the item as a PutCredential
	sec   secret
	rec   store.Credential
	idem  store.Request
	parts []string
	res   store.PutResult
	// err is why the item is not stored: a status error, as PutCredential
	// would have answered; nothing after it runs for the item.
	err error
}

// BatchPutCredentials stores many credentials of one tenant: each item as
// PutCredential would (allow-list, optional validation, sealing, store),
// sharing transit and Redis round trips, with a result of its own. An item
// that fails stores nothing; the others go on.
func (c *credentialServer) BatchPutCredentials(ctx context.Context, req *credentialsv1.BatchPutCredentialsRequest) (*credentialsv1.BatchPutCredentialsResponse, error) {
	s := c.s
	items := make([]*batchItem, len(req.GetItems()))
	for i, in := range req.GetItems() {
		items[i] = s.newBatchItem(ctx, req, i, in)
	}
	if !req.GetSkipValidation() {
		s.validateBatch(ctx, items)
	}
	s.sealBatch(ctx, items)
	s.storeBatch(ctx, items)

	resp := &credentialsv1.BatchPutCredentialsResponse{Results: make([]*credentialsv1.BatchPutResult, len(items))}
	outcomes := make([]authz.ItemOutcome, len(items))
	var events []Event
	stored, failed, replayed := 0, 0, 0
	for i, it := range items {
		r := &credentialsv1.BatchPutResult{CredentialId: it.put.GetCredentialId()}
		outcomes[i] = authz.ItemOutcome{CredentialID: r.CredentialId, Err: it.err}
		if it.err != nil {
			r.Error = itemError(i, it.err)
			failed++
		} else {
			r.Credential, r.Created = s.toProto(it.res.Credential), it.res.Created
			stored++
			if it.res.Replayed {
				replayed++
			} else {
				events = append(events, storedEvent(it.res.Credential, it.res.Created))
			}
		}
		resp.Results[i] = r
	}
	authz.RecordItems(ctx, outcomes)
	s.cfg.Logger.InfoContext(ctx, "credentials stored in a batch", "tenant_id", req.GetTenantId(), "items", len(items),
		"stored", stored, "failed", failed, "replayed", replayed, "validated", !req.GetSkipValidation())
	s.emitAll(ctx, events)
	return resp, nil
}

// newBatchItem reads item i of req as the PutCredential it stands for,
// checks its base URL, and makes its idempotency request.
func (s *Service) newBatchItem(ctx context.Context, req *credentialsv1.BatchPutCredentialsRequest, i int, in *credentialsv1.BatchPutItem) *batchItem {
	it := &batchItem{index: i, put: &credentialsv1.PutCredentialRequest{
		TenantId: req.GetTenantId(), CredentialId: in.GetCredentialId(), Labels: in.GetLabels(),
		SkipValidation: req.GetSkipValidation(), ExpectedVersion: in.ExpectedVersion,
	}}
	if !putSecretOf(in, it.put) {
		it.err = errNoProvider
		return it
	}
	sec, baseURLField, err := s.secretFromPut(it.put)
	if err != nil {
		it.err = err
		return it
	}
	it.sec = sec
	if err := s.cfg.AllowList.Check(sec.baseURL); err != nil {
		it.err = apierr.Field(baseURLField, "base URL not allowed: "+err.Error())
		return it
	}
	if id := req.GetRequestId(); id != "" {
		// One request per item, under an id no PutCredential can send
		// ('~' is not allowed in request ids) and no other item shares.
		parts, err := requestParts(ctx, "batchput\x00"+req.GetTenantId()+"\x00"+strconv.FormatBool(req.GetSkipValidation()), in)
		if err != nil {
			it.err = s.toStatus(ctx, "put credential", err)
			return it
		}
		it.idem = store.Request{ID: "batch~" + id + "~" + in.GetCredentialId(), Hash: s.cfg.HandleKeys.RequestHash(parts...)}
		it.parts = parts
	}
	it.rec = s.newRecord(req.GetTenantId(), in.GetCredentialId(), sec, in.GetLabels(), store.Validation{State: store.ValidationNotValidated})
	return it
}

// putSecretOf sets the secret of put from item's: the oneof case of the
// same name (BatchPutItem's cases are PutCredentialRequest's), so the
// provider registry reads a batch item as it reads a PutCredential.
func putSecretOf(item *credentialsv1.BatchPutItem, put *credentialsv1.PutCredentialRequest) bool {
	src := item.ProtoReflect()
	fd := src.WhichOneof(src.Descriptor().Oneofs().ByName("secret"))
	if fd == nil {
		return false
	}
	dst := put.ProtoReflect()
	target := dst.Descriptor().Fields().ByName(fd.Name())
	if target == nil || target.ContainingOneof() == nil || target.Message() == nil || target.Message().FullName() != fd.Message().FullName() {
		return false
	}
	dst.Set(target, src.Get(fd))
	return true
}

// validateBatch asks the provider about every item still going,
// batchValidators at a time; the provider's own login limits pace them.
// An item whose provider refuses or cannot answer (within the call's
// deadline) fails alone.
func (s *Service) validateBatch(ctx context.Context, items []*batchItem) {
	g := new(errgroup.Group)
	g.SetLimit(batchValidators)
	for _, it := range items {
		if it.err != nil {
			continue
		}
		g.Go(func() error {
			v, err := s.validate(ctx, it.sec)
			if err != nil {
				it.err = s.toStatus(ctx, "validate credential", err)
				return nil
			}
			it.rec.ValidateTime, it.rec.ValidationState, it.rec.ValidationMessage = v.Time, v.State, v.Message
			it.rec.UpstreamUser, it.rec.LastUsedTime = v.UpstreamUser, v.Time
			return nil
		})
	}
	_ = g.Wait()
}

// sealBatch encrypts and fingerprints every item still going, in transit
// calls of up to sealChunk items each (the encrypts and the HMACs at once),
// each item with its own outcome.
func (s *Service) sealBatch(ctx context.Context, items []*batchItem) {
	var live []*batchItem
	v := s.sealVersion()
	var enc []transit.TenantItem
	var macs [][]byte
	for _, it := range items {
		if it.err != nil {
			continue
		}
		plain, err := it.sec.plaintext()
		if err == nil {
			var ad, in []byte
			if ad, err = associatedData(v, it.rec); err == nil {
				if in, err = fingerprintInput(it.rec.TenantID, it.sec); err == nil {
					live = append(live, it)
					enc = append(enc, transit.TenantItem{Tenant: it.rec.TenantID, Item: transit.Item{AssociatedData: ad, Plaintext: plain}})
					macs = append(macs, in)
					continue
				}
			}
		}
		it.err = s.toStatus(ctx, "put credential", err)
	}
	if len(live) == 0 {
		return
	}
	b, ok := s.cfg.Transit.(transit.Batcher)
	if !ok {
		s.sealEach(ctx, live)
		return
	}
	encRes := make([]transit.ItemResult, len(live))
	macRes := make([]transit.ItemResult, len(live))
	g := new(errgroup.Group)
	g.SetLimit(sealCalls)
	for off := 0; off < len(live); off += sealChunk {
		end := min(off+sealChunk, len(live))
		g.Go(func() error {
			res, err := b.EncryptEach(ctx, enc[off:end])
			copyResults(encRes[off:end], res, err)
			return nil
		})
		g.Go(func() error {
			res, err := b.HMACEach(ctx, macs[off:end])
			copyResults(macRes[off:end], res, err)
			return nil
		})
	}
	_ = g.Wait()
	for k, it := range live {
		switch {
		case encRes[k].Err != nil:
			it.err = s.toStatus(ctx, "put credential", fmt.Errorf("encrypt secret: %w", encRes[k].Err))
		case macRes[k].Err != nil:
			it.err = s.toStatus(ctx, "put credential", fmt.Errorf("fingerprint secret: %w", macRes[k].Err))
		default:
			it.rec.Ciphertext, it.rec.ADVersion, it.rec.Fingerprint = encRes[k].Ciphertext, v, fingerprintOf(macRes[k].MAC)
		}
	}
}

// copyResults puts res into out, or err into each of out's items when the
// call failed as a whole.
func copyResults(out, res []transit.ItemResult, err error) {
	if err == nil && len(res) != len(out) {
		err = fmt.Errorf("transit: %d results for %d items: %w", len(res), len(out), transit.ErrUnavailable)
	}
	if err != nil {
		for i := range out {
			out[i].Err = err
		}
		return
	}
	copy(out, res)
}

// sealEach seals items one by one, a few at once: for a transit that
// cannot answer item by item.
func (s *Service) sealEach(ctx context.Context, items []*batchItem) {
	g := new(errgroup.Group)
	g.SetLimit(sealCalls)
	for _, it := range items {
		g.Go(func() error {
			if err := s.sealRecord(ctx, &it.rec, it.sec); err != nil {
				it.err = s.toStatus(ctx, "put credential", err)
			}
			return nil
		})
	}
	_ = g.Wait()
}

// storeBatch writes every item still going in one store call and reads
// each item's result.
func (s *Service) storeBatch(ctx context.Context, items []*batchItem) {
	var live []*batchItem
	var puts []store.PutItem
	for _, it := range items {
		if it.err == nil {
			live = append(live, it)
			puts = append(puts, store.PutItem{Credential: it.rec, Options: store.PutOptions{Request: it.idem, ExpectedVersion: it.put.ExpectedVersion}})
		}
	}
	if len(live) == 0 {
		return
	}
	results := s.cfg.Store.PutCredentials(ctx, puts)
	for k, it := range live {
		r := results[k]
		switch {
		case errors.Is(r.Err, store.ErrVersionConflict) && it.put.ExpectedVersion != nil:
			it.err = errNotAtExpectedVersion(*it.put.ExpectedVersion)
		case r.Err != nil:
			it.err = s.toStatus(ctx, "put credential", r.Err)
		default:
			if err := s.checkReplay(r.Replay, it.parts); err != nil {
				it.err = err
				continue
			}
			it.res = r.PutResult
		}
	}
}

// emitAll announces the puts of a batch, in one publication.
func (s *Service) emitAll(ctx context.Context, evs []Event) {
	if s.cfg.Events == nil || len(evs) == 0 {
		return
	}
	now := s.cfg.Now()
	for i := range evs {
		if evs[i].Time.IsZero() {
			evs[i].Time = now
		}
	}
	if err := s.cfg.Events.PublishAll(context.WithoutCancel(ctx), evs); err != nil {
		s.cfg.Logger.WarnContext(ctx, "credential events of a batch not all published", "tenant_id", evs[0].TenantID, "events", len(evs), "error", err)
	}
}

// itemError is the result form of item i's status error: its code,
// reason, message, the field at fault (prefixed with the item) and how long
// to wait.
func itemError(i int, err error) *credentialsv1.ItemError {
	st := status.Convert(err)
	out := &credentialsv1.ItemError{Code: int32(st.Code()), Reason: apierr.Reason(err), Message: st.Message()}
	for _, d := range st.Details() {
		switch d := d.(type) {
		case *errdetails.BadRequest:
			if v := d.GetFieldViolations(); len(v) > 0 {
				out.Field = "items[" + strconv.Itoa(i) + "]." + v[0].GetField()
			}
		case *errdetails.RetryInfo:
			if d.GetRetryDelay() != nil {
				out.RetryAfter = durationpb.New(d.GetRetryDelay().AsDuration())
			}
		}
	}
	return out
}
