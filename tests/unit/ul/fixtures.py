"""Hand-annotated raw PDUs (PS3.8 9.3), byte by byte; the tests cross-check them with pynetdicom."""

from __future__ import annotations

# A-ASSOCIATE-RQ (PS3.8 9.3.2, Table 9-11): ECHOSCU asks ANY-SCP for Verification.
ASSOCIATE_RQ = bytes.fromhex(
    "01"  # PDU-type: A-ASSOCIATE-RQ
    "00"  # reserved
    "000000cd"  # PDU-length: 205
    "0001"  # protocol-version: bit 0 (version 1)
    "0000"  # reserved
    "414e592d5343502020202020"
    "20202020"  # Called-AE-title "ANY-SCP" padded to 16
    "4543484f53435520202020202020"
    "2020"  # Calling-AE-title "ECHOSCU" padded to 16
    + "00"
    * 32  # reserved
    + "10"  # item 0x10: Application Context (PS3.8 9.3.2.1)
    "00"  # reserved
    "0015"  # item-length: 21
    "312e322e3834302e31303030382e332e312e312e31"  # "1.2.840.10008.3.1.1.1"
    "20"  # item 0x20: Presentation Context (PS3.8 9.3.2.2)
    "00"
    "002e"  # item-length: 46
    "01"  # presentation-context-ID: 1
    "000000"  # reserved x3
    "30"  # sub-item 0x30: Abstract Syntax (PS3.8 9.3.2.2.1)
    "00"
    "0011"  # 17
    "312e322e3834302e31303030382e312e31"  # "1.2.840.10008.1.1" (Verification)
    "40"  # sub-item 0x40: Transfer Syntax (PS3.8 9.3.2.2.2)
    "00"
    "0011"  # 17
    "312e322e3834302e31303030382e312e32"  # "1.2.840.10008.1.2" (Implicit VR Little Endian)
    "50"  # item 0x50: User Information (PS3.8 9.3.2.3)
    "00"
    "003a"  # item-length: 58
    "51"  # sub-item 0x51: Maximum Length (PS3.8 D.1)
    "00"
    "0004"
    "00004000"  # maximum-length-received: 16384
    "52"  # sub-item 0x52: Implementation Class UID (PS3.7 D.3.3.2)
    "00"
    "001b"  # 27
    "312e322e3832362e302e312e333638303034332e392e3338313130"  # "1.2.826.0.1.3680043.9.38110"
    "55"  # sub-item 0x55: Implementation Version Name
    "00"
    "000f"  # 15
    "50594e45544449434f4d5f333034"  # "PYNETDICOM_304"
    "20"  # (padding space, part of the 15 bytes)
)

# A-ASSOCIATE-AC (PS3.8 9.3.3, Table 9-17) answering ASSOCIATE_RQ: context 1 accepted.
ASSOCIATE_AC = bytes.fromhex(
    "02"  # PDU-type: A-ASSOCIATE-AC
    "00"
    "000000b8"  # PDU-length: 184
    "0001"  # protocol-version
    "0000"
    "414e592d53435020202020202020"
    "2020"  # reserved, echoes the RQ's Called-AE-title
    "4543484f53435520202020202020"
    "2020" + "00" * 32 + "10"  # reserved, echoes the RQ's Calling-AE-title
    "00"
    "0015"
    "312e322e3834302e31303030382e332e312e312e31"  # Application Context
    "21"  # item 0x21: Presentation Context, AC form (PS3.8 9.3.3.2)
    "00"
    "0019"  # item-length: 25
    "01"  # presentation-context-ID: 1
    "00"  # reserved
    "00"  # result/reason: 0 acceptance
    "00"  # reserved
    "40"
    "00"
    "0011"
    "312e322e3834302e31303030382e312e32"  # Transfer Syntax: Implicit VR LE
    "50"
    "00"
    "003a"  # User Information, 58 bytes
    "51"
    "00"
    "0004"
    "00008000"  # Maximum Length: 32768
    "52"
    "00"
    "001b"
    "312e322e3832362e302e312e333638303034332e392e3338313130"
    "55"
    "00"
    "000f"
    "50594e45544449434f4d5f33303420"
)

# P-DATA-TF (PS3.8 9.3.5) with one PDV (9.3.5.1): a whole C-ECHO-RQ command set.
P_DATA_ECHO_RQ = bytes.fromhex(
    "04"  # PDU-type: P-DATA-TF
    "00"
    "0000004a"  # PDU-length: 74
    "00000046"  # PDV item-length: 70 (context ID + control header + 68 bytes)
    "01"  # presentation-context-ID: 1
    "03"  # message control header: bit 0 command, bit 1 last fragment (PS3.8 E.2)
    # (0000,0000) UL 56: command group length
    "0000000004000000"
    "38000000"
    # (0000,0002) UI "1.2.840.10008.1.1\0"
    "0000020012000000"
    "312e322e3834302e31303030382e312e3100"
    # (0000,0100) US 0x0030: C-ECHO-RQ
    "0000000102000000"
    "3000"
    # (0000,0110) US 1: message ID
    "0000100102000000"
    "0100"
    # (0000,0800) US 0x0101: no data set
    "0000000802000000"
    "0101"
)

ASSOCIATE_RJ = bytes.fromhex(
    "03"  # PDU-type: A-ASSOCIATE-RJ (PS3.8 9.3.4)
    "00"
    "00000004"  # fixed PDU-length
    "00"  # reserved
    "01"  # result: rejected-permanent
    "01"  # source: DICOM UL service-user
    "07"  # reason: called-AE-title-not-recognized
)

RELEASE_RQ = bytes.fromhex("05000000000400000000")  # PS3.8 9.3.6
RELEASE_RP = bytes.fromhex("06000000000400000000")  # PS3.8 9.3.7

ABORT_PROVIDER_UNEXPECTED = bytes.fromhex(
    "07"  # PDU-type: A-ABORT (PS3.8 9.3.8)
    "00"
    "00000004"
    "00"  # reserved
    "00"  # reserved
    "02"  # source: DICOM UL service-provider
    "02"  # reason: unexpected-PDU
)

HTTP_REQUEST = b"GET / HTTP/1.1\r\nHost: relay.example\r\nUser-Agent: curl/8.0\r\n\r\n"
