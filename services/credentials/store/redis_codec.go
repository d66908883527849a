package store

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"strconv"
	"time"
)

// Record hash fields.
const (
	fTenant            = "tenant"
	fID                = "id"
	fProvider          = "provider"
	fVersion           = "version"
	fGeneration        = "generation"
	fCiphertext        = "ciphertext"
	fADVersion         = "ad_version"
	fFingerprint       = "fingerprint"
	fBaseURL           = "base_url"
	fFleetUpAccountID  = "fleetup_account_id"
	fLabels            = "labels"
	fCreateTime        = "create_time"
	fUpdateTime        = "update_time"
	fValidateTime      = "validate_time"
	fValidationState   = "validation_state"
	fValidationMessage = "validation_message"
	fUpstreamUser      = "upstream_user"
	fTokenExpireTime   = "token_expire_time"
	fLastUsedTime      = "last_used_time"
)

// splitReply splits a script reply into its status and its string payload.
func splitReply(reply []any) (int64, []string, error) {
	if len(reply) == 0 {
		return 0, nil, errors.New("store: empty script reply")
	}
	status, ok := reply[0].(int64)
	if !ok {
		return 0, nil, fmt.Errorf("store: script status is %T, not an integer", reply[0])
	}
	rest := make([]string, len(reply)-1)
	for i, v := range reply[1:] {
		s, ok := v.(string)
		if !ok {
			return 0, nil, fmt.Errorf("store: script reply element is %T, not a string", v)
		}
		rest[i] = s
	}
	return status, rest, nil
}

func pairsToMap(pairs []string) (map[string]string, error) {
	if len(pairs)%2 != 0 {
		return nil, errors.New("store: odd number of hash fields in script reply")
	}
	m := make(map[string]string, len(pairs)/2)
	for i := 0; i < len(pairs); i += 2 {
		m[pairs[i]] = pairs[i+1]
	}
	return m, nil
}

// validationFields are the hash fields a Validation sets. Empty values are
// written too, so a new outcome clears the old one's message or user.
func validationFields(v Validation) []any {
	return []any{
		fValidateTime, formatTime(v.Time),
		fValidationState, v.State,
		fValidationMessage, v.Message,
		fUpstreamUser, v.UpstreamUser,
	}
}

func parseCredential(m map[string]string) (Credential, error) {
	c := Credential{
		TenantID:          m[fTenant],
		CredentialID:      m[fID],
		Provider:          m[fProvider],
		Generation:        m[fGeneration],
		Ciphertext:        m[fCiphertext],
		Fingerprint:       m[fFingerprint],
		BaseURL:           m[fBaseURL],
		ValidationState:   m[fValidationState],
		ValidationMessage: m[fValidationMessage],
		UpstreamUser:      m[fUpstreamUser],
	}
	var errs []error
	c.Version, errs = parseInt(m[fVersion], errs)
	c.FleetUpAccountID, errs = parseInt(m[fFleetUpAccountID], errs)
	var ad int64
	ad, errs = parseInt(m[fADVersion], errs)
	c.ADVersion = max(int(ad), 1) // absent: written before versions, sealed with version 1
	c.CreateTime, errs = parseTime(m[fCreateTime], errs)
	c.UpdateTime, errs = parseTime(m[fUpdateTime], errs)
	c.ValidateTime, errs = parseTime(m[fValidateTime], errs)
	c.TokenExpireTime, errs = parseTime(m[fTokenExpireTime], errs)
	c.LastUsedTime, errs = parseTime(m[fLastUsedTime], errs)
	if c.Generation == "" && len(errs) == 0 {
		// A record written before generations existed: derive one that
		// still changes when the credential is deleted and created again.
		c.Generation = "legacy-" + strconv.FormatInt(c.CreateTime.UnixNano(), 36) + "-" + strconv.FormatInt(c.Version, 10)
	}
	if m[fLabels] != "" {
		if err := json.Unmarshal([]byte(m[fLabels]), &c.Labels); err != nil {
			errs = append(errs, err)
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Credential{}, fmt.Errorf("store: corrupt credential record %s/%s: %w", c.TenantID, c.CredentialID, err)
	}
	return c, nil
}

func parseInt(s string, errs []error) (int64, []error) {
	if s == "" {
		return 0, errs
	}
	n, err := strconv.ParseInt(s, 10, 64)
	if err != nil {
		return 0, append(errs, err)
	}
	return n, errs
}

// encodeLabels stores labels as JSON; no labels is the empty string, and
// reads back as a nil map.
func encodeLabels(labels map[string]string) (string, error) {
	if len(labels) == 0 {
		return "", nil
	}
	b, err := json.Marshal(labels)
	if err != nil {
		return "", fmt.Errorf("store: encode labels: %w", err)
	}
	return string(b), nil
}

// Times are stored as UTC RFC 3339 with nanoseconds (exact round trip);
// the zero time is the empty string.
func formatTime(t time.Time) string {
	if t.IsZero() {
		return ""
	}
	return t.UTC().Format(time.RFC3339Nano)
}

func parseTime(s string, errs []error) (time.Time, []error) {
	if s == "" {
		return time.Time{}, errs
	}
	t, err := time.Parse(time.RFC3339Nano, s)
	if err != nil {
		return time.Time{}, append(errs, err)
	}
	return t, errs
}

func decodeSession(raw []byte) (Session, error) {
	var rec sessionRecord
	if err := json.Unmarshal(raw, &rec); err != nil {
		return Session{}, fmt.Errorf("store: decode session: %w", err)
	}
	return rec.session()
}

// sessionRecord is a Session as stored (JSON).
type sessionRecord struct {
	HandleHash   string    `json:"handle_hash"`
	SessionID    string    `json:"session_id"`
	TenantID     string    `json:"tenant_id"`
	CredentialID string    `json:"credential_id"`
	Scopes       []string  `json:"scopes,omitempty"`
	CreateTime   time.Time `json:"create_time"`
	ExpireTime   time.Time `json:"expire_time"`
	Binding      string    `json:"binding,omitempty"`
}

func newSessionRecord(s Session) sessionRecord {
	return sessionRecord{
		HandleHash:   hex.EncodeToString(s.HandleHash[:]),
		SessionID:    s.SessionID,
		TenantID:     s.TenantID,
		CredentialID: s.CredentialID,
		Scopes:       s.Scopes,
		CreateTime:   s.CreateTime.UTC(),
		ExpireTime:   s.ExpireTime.UTC(),
		Binding:      s.Binding,
	}
}

func (rec sessionRecord) session() (Session, error) {
	s := Session{
		SessionID:    rec.SessionID,
		TenantID:     rec.TenantID,
		CredentialID: rec.CredentialID,
		Scopes:       rec.Scopes,
		CreateTime:   rec.CreateTime,
		ExpireTime:   rec.ExpireTime,
		Binding:      rec.Binding,
	}
	h, err := hex.DecodeString(rec.HandleHash)
	if err != nil || len(h) != len(s.HandleHash) {
		return Session{}, fmt.Errorf("store: corrupt session record %s", rec.SessionID)
	}
	copy(s.HandleHash[:], h)
	return s, nil
}
