from twisted.application.service import ServiceMaker

monedge = ServiceMaker(
    "monedge",
    "monedge.tap",
    "A convention-routed edge proxy: service.<tier>.<name> serves /<name>/...",
    "monedge",
)
