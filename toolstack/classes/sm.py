"""SM: one record per registered driver, filled from sr_get_driver_info at start-up."""
from smtap.toolstack.objects import ApiClass, Field, MAP, SET, RW

SM = ApiClass("SM", [
    Field("name_label"), Field("name_description"), Field("type"), Field("vendor"),
    Field("copyright"), Field("version"), Field("required_api_version"),
    Field("configuration", MAP), Field("capabilities", SET), Field("features", MAP),
    Field("other_config", MAP, setter=RW), Field("driver_filename"),
    Field("required_cluster_stack", SET), Field("supported_image_formats", SET),
], by_name_label=True, needs_drivers=True)
