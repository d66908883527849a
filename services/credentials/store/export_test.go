package store

// Hashes of the scripts whose writes must reach the replicas, for tests
// that watch the commands the store sends.
var DurableScriptHashes = map[string]string{
	putScript.Hash():       "put",
	putBatchScript.Hash():  "put batch",
	deleteScript.Hash():    "delete",
	casFieldsScript.Hash(): "cas",
}
