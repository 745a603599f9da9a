"""The SMAPIv1 framework: what every SR driver shares (imported as smtap.sm).

command   run(SRClass, DRIVER_INFO): decode argv, dispatch, lock, answer on stdout
request   the call's parameters, and the keys XAPI sends for each command
sr, vdi   the base classes a driver subclasses; db_* helpers write XAPI's records
errors    SROSError and the codes of XE_SR_ERRORCODES.xml
lock      fcntl locks: Lock("sr", sr_uuid), Lock("vdi", vdi_uuid)
log       the driver log (settings.log_file())
xapi      a XenAPI session on the local socket, reusing XAPI's session_ref
wire      the XML-RPC encoding; driverinfo: capabilities and features
drivers/  one module per SR type; DummySR.py is the template
"""
